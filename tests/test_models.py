"""The tiny offline models are deterministic, cached, and shaped as the test bed needs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from testbed import models as tm


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_generation_is_deterministic_and_cached(tiny_models, tmp_path):
    again = tm.ensure_models(tmp_path / "fresh")
    for name in (tm.DENSE, tm.MOE):
        assert _digest(again.path(name)) == _digest(tiny_models.path(name))
        assert (again.path(name) / "tokenizer.json").read_text() == \
            (tiny_models.path(name) / "tokenizer.json").read_text()
    stamp = (again.dense / "model.safetensors").stat().st_mtime_ns
    assert tm.ensure_models(tmp_path / "fresh") == again
    assert (again.dense / "model.safetensors").stat().st_mtime_ns == stamp


def test_recipe_change_lands_in_a_new_directory(monkeypatch):
    before = tm.recipe_hash(tm.DENSE)
    monkeypatch.setitem(tm.MODEL_RECIPES, tm.DENSE,
                        {**tm.MODEL_RECIPES[tm.DENSE], "arch": "llama-v2"})
    assert tm.recipe_hash(tm.DENSE) != before


def test_model_shapes_and_dtype(tiny_models):
    dense = json.loads((tiny_models.dense / "config.json").read_text())
    moe = json.loads((tiny_models.moe / "config.json").read_text())
    assert dense["architectures"] == ["LlamaForCausalLM"]
    assert (dense["hidden_size"], dense["num_hidden_layers"]) == (128, 2)
    assert moe["architectures"] == ["Qwen3MoeForCausalLM"]
    assert moe.get("num_experts", moe.get("num_local_experts")) == 8
    assert moe["num_experts_per_tok"] == 2
    for cfg in (dense, moe):
        assert cfg["dtype"] == "bfloat16" and cfg["vocab_size"] == tm.VOCAB_SIZE
        header = (tiny_models.dense / "model.safetensors").read_bytes()
        n = int.from_bytes(header[:8], "little")
        tensors = json.loads(header[8:8 + n])
        assert {t["dtype"] for k, t in tensors.items() if k != "__metadata__"} == {"BF16"}


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models.dense)
    assert len(tok) == tm.VOCAB_SIZE
    text = "Hello world, the scheduler splits 12345 tokens."
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
