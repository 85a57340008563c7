"""Price tables: token and accelerator arithmetic, glob precedence, load-time errors."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest

from llmtrace import pricing
from llmtrace.pricing import ModelPrice, PriceTable, PriceTableError
from testbed.models import DENSE, MOE

REPO = Path(__file__).resolve().parents[1]

TABLE = """\
currency: USD
models:
  tiny-llama:
    input_per_1m: 0.20
    output_per_1m: 0.60
    cached_input_per_1m: 0.05
  no-discount:
    input_per_1m: 1.0
    output_per_1m: 2.0
  "meta-llama/*":
    input_per_1m: 0.50
    output_per_1m: 1.50
  "meta-llama/Llama-3.1-8B*":
    input_per_1m: 0.05
    output_per_1m: 0.08
  "meta-llama/Llama-3.1-8B-Instruct":
    input_per_1m: 0.01
    output_per_1m: 0.02
  "qwen-?b":
    input_per_1m: 3
    output_per_1m: 4
instances:
  h100-80gb:
    per_accelerator_hour: 4.10
  l4:
    per_accelerator_hour: 0.80
default_instance: h100-80gb
"""


def _write(tmp_path: Path, text: str, name: str = "prices.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def table(tmp_path: Path) -> PriceTable:
    return PriceTable.load(_write(tmp_path, TABLE))


# -- token cost ---------------------------------------------------------------------------------


def test_token_cost_charges_cached_prompt_at_cached_rate(table: PriceTable):
    # 1000 prompt tokens of which 400 cached, 500 output.
    expected = (600 * 0.20 + 400 * 0.05 + 500 * 0.60) / 1e6
    assert table.token_cost("tiny-llama", 1000, 400, 500) == pytest.approx(expected)


def test_token_cost_without_cached_price_uses_input_price(table: PriceTable):
    assert table.price_for("no-discount").cached_rate == 1.0
    cost = table.token_cost("no-discount", 1_000_000, 250_000, 1_000_000)
    assert cost == pytest.approx(1.0 + 2.0)


def test_token_cost_clamps_inconsistent_counts(table: PriceTable):
    # More cached than prompt: uncached clamps at 0 and cached is charged for the prompt only.
    assert table.token_cost("tiny-llama", 100, 300, 0) == pytest.approx(100 * 0.05 / 1e6)
    # Negative and missing counts count as zero instead of raising.
    assert table.token_cost("tiny-llama", -5, -5, -5) == 0.0
    assert table.token_cost("tiny-llama", None, None, 10) == pytest.approx(10 * 0.60 / 1e6)
    assert table.token_cost("tiny-llama", 0, 0, 0) == 0.0


def test_unknown_model_is_unpriced_not_an_error(table: PriceTable):
    assert table.price_for("gpt-x") is None
    assert table.token_cost("gpt-x", 100, 0, 100) is None
    assert table.token_cost("", 1, 0, 1) is None
    assert table.token_cost(None, 1, 0, 1) is None  # type: ignore[arg-type]


# -- lookup -------------------------------------------------------------------------------------


def test_exact_name_beats_globs_and_longest_glob_wins(table: PriceTable):
    exact = table.price_for("meta-llama/Llama-3.1-8B-Instruct")
    assert exact == ModelPrice(input_per_1m=0.01, output_per_1m=0.02)
    longest = table.price_for("meta-llama/Llama-3.1-8B-Base")
    assert longest is not None and longest.input_per_1m == 0.05
    fallback = table.price_for("meta-llama/Llama-3.1-70B-Instruct")
    assert fallback is not None and fallback.input_per_1m == 0.50
    # '?' matches one character; matching is case-sensitive on every platform.
    assert table.price_for("qwen-7b") is not None
    assert table.price_for("qwen-72b") is None
    assert table.price_for("Meta-Llama/x") is None


def test_longest_glob_wins_regardless_of_file_order():
    table = PriceTable.from_mapping({
        "currency": "USD",
        "models": {
            "*": {"input_per_1m": 9, "output_per_1m": 9},
            "a*": {"input_per_1m": 2, "output_per_1m": 2},
            "ab*": {"input_per_1m": 1, "output_per_1m": 1},
        },
    })
    assert table.price_for("abc").input_per_1m == 1
    assert table.price_for("axc").input_per_1m == 2
    assert table.price_for("zzz").input_per_1m == 9


def test_lookup_cache_is_bounded_and_table_stays_copyable(table, monkeypatch):
    monkeypatch.setattr(pricing, "LOOKUP_CACHE_SIZE", 8)
    for i in range(50):
        table.price_for(f"unknown-{i}")
        assert len(table._cache) <= 8
    assert table.price_for("tiny-llama") is not None  # still correct after evictions
    expected = table.token_cost("tiny-llama", 10, 0, 10)
    for clone in (pickle.loads(pickle.dumps(table)), copy.deepcopy(table)):
        assert clone.token_cost("tiny-llama", 10, 0, 10) == expected


# -- accelerator cost ---------------------------------------------------------------------------


def test_accelerator_cost_default_and_explicit_instance(table: PriceTable):
    assert table.accelerator_cost(3600) == pytest.approx(4.10)
    assert table.accelerator_cost(1800, "l4") == pytest.approx(0.40)
    assert table.accelerator_cost(90, "h100-80gb") == pytest.approx(4.10 * 90 / 3600)
    assert table.accelerator_cost(3600, "tpu-v5") is None
    assert table.accelerator_cost(-1) == 0.0


def test_accelerator_cost_without_default_instance_is_none():
    table = PriceTable.from_mapping({
        "currency": "USD",
        "instances": {"l4": {"per_accelerator_hour": 0.8}},
    })
    assert table.accelerator_cost(3600) is None
    assert table.accelerator_cost(3600, "l4") == pytest.approx(0.8)


# -- errors -------------------------------------------------------------------------------------


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(PriceTableError) as info:
        PriceTable.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


_MODEL = "currency: USD\nmodels:\n  tiny-llama:\n"


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(
        _MODEL + "    input_per_1m: 0.2\n    output_per_1m: -0.6\n",
        "models.tiny-llama.output_per_1m: must be >= 0", id="negative-price"),
    pytest.param(
        _MODEL + "    input_per_1m: 0.2\n    output_per_1m: 0.6\n    cached_input_per_1m: -1\n",
        "models.tiny-llama.cached_input_per_1m: must be >= 0", id="negative-cached"),
    pytest.param(
        _MODEL + "    input_per_1m: 0.2\n    output_per_1m: 0.6\n    outptu_per_1m: 0.6\n",
        "models.tiny-llama.outptu_per_1m: unknown key", id="unknown-model-key"),
    pytest.param(
        _MODEL + "    input_per_1m: 0.2\n",
        "models.tiny-llama.output_per_1m: required", id="missing-model-field"),
    pytest.param(
        _MODEL + "    input_per_1m: .inf\n    output_per_1m: 0.6\n",
        "models.tiny-llama.input_per_1m: must be a finite number", id="infinite-price"),
    pytest.param(
        _MODEL + "    input_per_1m: '0.2'\n    output_per_1m: yes\n",
        "models.tiny-llama.input_per_1m: must be a number", id="non-numeric-price"),
    pytest.param(
        "currency: USD\nmodels:\n  meta-llama/Llama-3.1-8B:\n    input_per_1m: -1\n"
        "    output_per_1m: 1\n",
        'models."meta-llama/Llama-3.1-8B".input_per_1m: must be >= 0', id="dotted-model-name"),
    pytest.param(
        "currency: USD\ninstances:\n  h100-80gb:\n    per_accelerator_hour: -4.1\n",
        "instances.h100-80gb.per_accelerator_hour: must be >= 0", id="negative-instance"),
    pytest.param(
        "currency: USD\ninstances:\n  h100-80gb: {}\n",
        "instances.h100-80gb.per_accelerator_hour: required", id="missing-instance-field"),
    pytest.param(
        "currency: USD\ninstances:\n  l4:\n    per_accelerator_hour: 1\ndefault_instance: h100\n",
        "default_instance: 'h100' is not an entry of instances (l4)", id="bad-default-instance"),
    pytest.param(
        "currency: USD\ndefault_instance: h100\n",
        "default_instance: 'h100' is not an entry of instances", id="default-without-instances"),
    pytest.param("currency: EUR\n", "currency: only USD is supported, got 'EUR'", id="eur"),
    pytest.param("models: {}\n", "currency: required", id="missing-currency"),
    pytest.param("currency: USD\nmodel: {}\n", "model: unknown key", id="unknown-top-key"),
    pytest.param("currency: USD\nmodels: [a, b]\n", "models: must be a mapping", id="models-list"),
    pytest.param("currency: USD\nmodels:\n  a: 3\n", "models.a: must be a mapping",
                 id="model-not-mapping"),
    pytest.param("", "empty price table", id="empty-file"),
    pytest.param("# only a comment\n", "empty price table", id="comment-only-file"),
    pytest.param("- a\n- b\n", "expected a mapping at the top level, got list", id="top-list"),
    pytest.param("currency: [USD\n", "not valid YAML", id="bad-yaml"),
])
def test_invalid_table_names_file_and_key_path(tmp_path: Path, body: str, expected: str):
    assert expected in _error(tmp_path, body)


def test_all_problems_are_reported_at_once(tmp_path: Path):
    message = _error(tmp_path, "currency: GBP\nmodels:\n  m:\n    input_per_1m: -1\n")
    assert "currency: only USD" in message
    assert "models.m.input_per_1m: must be >= 0" in message
    assert "models.m.output_per_1m: required" in message


def test_missing_file_is_a_price_table_error(tmp_path: Path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(PriceTableError, match="absent.yaml: cannot read"):
        PriceTable.load(path)


def test_from_mapping_names_its_source():
    with pytest.raises(PriceTableError, match=r"^inline: currency: required$"):
        PriceTable.from_mapping({}, source="inline")
    with pytest.raises(PriceTableError, match=r"^<mapping>: empty price table$"):
        PriceTable.from_mapping(None)


def test_price_table_error_is_a_value_error():
    assert issubclass(PriceTableError, ValueError)


# -- the shipped example ------------------------------------------------------------------------


def test_example_table_loads_and_prices_the_test_models():
    table = PriceTable.load(REPO / "examples" / "prices.yaml")
    assert table.currency == "USD"
    for model in (DENSE, MOE):
        cost = table.token_cost(model, 1000, 200, 100)
        assert cost is not None and cost > 0
    assert table.default_instance in table.instances
    assert {"h100-80gb", "h200-141gb", "l4", "cpu"} <= set(table.instances)
    default = table.instances[table.default_instance]
    assert table.accelerator_cost(3600) == default.per_accelerator_hour


def test_example_commented_entries_are_valid_when_uncommented(tmp_path: Path):
    text = (REPO / "examples" / "prices.yaml").read_text()
    entry = re.compile(r'^  # ("|  )', re.MULTILINE)
    assert len(entry.findall(text)) >= 8
    table = PriceTable.load(_write(tmp_path, entry.sub(r"  \1", text)))
    assert table.price_for("meta-llama/Llama-3.1-8B-Instruct").input_per_1m == 0.05
    assert table.price_for("meta-llama/Llama-3.1-70B-Instruct").input_per_1m == 0.40
    assert table.price_for("meta-llama/Llama-2-7b").input_per_1m == 0.50
    assert table.price_for(DENSE) is not None
