"""The drift detector: its statistics equal scipy's, its windows age, its baselines hold.

Reference values come from scipy on the same bins and the same smoothed proportions
(``drift.SMOOTHING``), at a relative tolerance of 1e-9: the monitor's plain-Python
sums and scipy's vectorised ones differ only by rounding.
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from llmtrace.quality import drift
from llmtrace.record import RequestRecord

REL = 1e-9
N = 4000


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rec(model="m", version="v1", end_s=0.0, prompt=100, output=50, entropy=2.0,
        finish="stop", ttft=0.1):
    """A record with the drift features only (``output_entropy`` is not on RequestRecord yet)."""
    return SimpleNamespace(model=model, version=version, end_ns=int(end_s * 1e9),
                           prompt_tokens=prompt, output_tokens=output, output_entropy=entropy,
                           finish_reason=finish, ttft_s=ttft)


MIX = {"stop": 0.8, "length": 0.15, "abort": 0.03, "error": 0.01, "content_filter": 0.01}
MIX_SHIFTED = {"stop": 0.5, "length": 0.4, "abort": 0.05, "error": 0.03,
               "content_filter": 0.02}


def sample(rng, n, shift):
    """Feature columns: lognormal token counts and TTFT, normal entropy, a finish mix.

    ``mean`` moves each numeric feature by one standard deviation (symmetrised KL of
    the underlying normals: 1.0), ``scale`` doubles it (1.125); both change the mix.
    """
    mu = 1.0 if shift == "mean" else 0.0
    sd = 2.0 if shift == "scale" else 1.0
    mix = MIX if shift == "none" else MIX_SHIFTED

    def tokens(median):
        return np.maximum(1, np.rint(np.exp(np.log(median) + sd * rng.normal(mu, 1, n))))

    return {
        "prompt_tokens": tokens(1000).astype(int),
        "output_tokens": tokens(200).astype(int),
        "output_entropy": np.maximum(0.0, 3.0 + 0.6 * sd * rng.normal(mu, 1, n)),
        "finish_reason": rng.choice(list(mix), size=n, p=list(mix.values())),
        "ttft_s": np.exp(np.log(0.2) + 0.8 * sd * rng.normal(mu, 1, n)),
    }


def feed(monitor, version, cols, end_s=0.0):
    n = len(cols["ttft_s"])
    for i in range(n):
        monitor.observe(rec(version=version, end_s=end_s, prompt=int(cols["prompt_tokens"][i]),
                            output=int(cols["output_tokens"][i]),
                            entropy=float(cols["output_entropy"][i]),
                            finish=str(cols["finish_reason"][i]), ttft=float(cols["ttft_s"][i])))


def binned(feature, values):
    """numpy's binning of one column: searchsorted 'left' is bisect_left (``le`` edges)."""
    if feature.categories:
        idx = [feature.categories.index(v) if v in feature.categories else
               len(feature.categories) - 1 for v in values]
    else:
        idx = np.searchsorted(np.asarray(feature.edges, dtype=float), values, side="left")
    return np.bincount(idx, minlength=feature.nbins)


def reference(b, c):
    """(PSI, KL, chi2, p) from scipy: PSI is the symmetrised KL of the smoothed proportions."""
    from scipy.stats import chi2_contingency, entropy

    p = (b + drift.SMOOTHING) / (b + drift.SMOOTHING).sum()
    q = (c + drift.SMOOTHING) / (c + drift.SMOOTHING).sum()
    keep = (b + c) > 0  # scipy rejects a table with an all-zero column
    res = chi2_contingency(np.array([b[keep], c[keep]]), correction=False)
    return entropy(q, p) + entropy(p, q), entropy(q, p), res.statistic, res.pvalue


@pytest.mark.parametrize("shift", ["none", "mean", "scale"])
def test_statistics_match_scipy_and_alert_thresholds(shift):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(7)
    base, cur = sample(rng, N, "none"), sample(rng, N, shift)
    monitor = drift.DriftMonitor("version:stable", clock=Clock(1.0))
    feed(monitor, "stable", base)
    feed(monitor, "canary", cur)
    rows = {r.feature: r for r in monitor.snapshot()}
    assert sorted(rows) == sorted(f.name for f in drift.FEATURES)
    for f in drift.FEATURES:
        b, c = binned(f, base[f.field]), binned(f, cur[f.field])
        row = rows[f.name]
        assert (row.model, row.version, row.baseline_n, row.current_n) == ("m", "canary", N, N)
        assert (row.psi, row.kl, row.chi2, row.p_value) == pytest.approx(reference(b, c), rel=REL)
        if shift == "none":
            assert row.psi < 0.1, f.name
        else:
            assert row.psi > 0.25 and row.p_value < 1e-6, f.name


def test_chi2_sf_without_scipy_matches_chdtrc(monkeypatch):
    special = pytest.importorskip("scipy.special")
    grid = [(dof, stat) for dof in (1, 2, 3, 5, 12, 16, 40)
            for stat in (1e-3, 0.5, 1.0, 3.0, 10.0, 25.0, 80.0, 300.0)]
    expected = [float(special.chdtrc(dof, stat)) for dof, stat in grid]
    monkeypatch.setitem(sys.modules, "scipy.special", None)  # the import now fails
    assert [drift.chi2_sf(dof, stat) for dof, stat in grid] == pytest.approx(expected, rel=REL)


def test_chi2_drops_bins_empty_on_both_sides():
    assert drift.chi2_test([0, 5, 0, 5], [0, 5, 0, 5])[0] == 0.0
    assert drift.chi2_test([10, 0], [10, 0]) == (0.0, 1.0)  # one bin left: nothing to test
    assert drift.psi([1, 2, 3], [1, 2, 3]) == 0.0 and drift.kl([0, 0], [5, 0]) > 0


def test_old_slots_age_out_as_the_clock_moves():
    clock = Clock()
    monitor = drift.DriftMonitor("pinned", window_s=60, slots=6, clock=clock)
    for t in range(10):
        monitor.observe(rec(end_s=t))  # slot 0
    for t in range(30, 35):
        monitor.observe(rec(end_s=t))  # slot 3

    def requests():
        return sum(monitor.counts("m", "v1")["finish_reason"])

    clock.now = 35
    assert requests() == 15
    clock.now = 65  # window is slots 1..6: slot 0 is out
    assert requests() == 5
    clock.now = 95  # slots 4..9
    assert requests() == 0
    monitor.observe(rec(end_s=61))  # slot 6 takes slot 0's ring position
    monitor.observe(rec(end_s=1))  # so slot 0's traffic is past keeping
    assert monitor.stale_records == 1
    clock.now = 61
    assert requests() == 6


def test_min_samples_gates_each_feature():
    monitor = drift.DriftMonitor("version:stable", min_samples=100, clock=Clock(1.0))
    for _ in range(100):
        monitor.observe(rec(version="stable"))
    for i in range(99):
        monitor.observe(rec(version="canary", entropy=None if i % 2 else 2.0))
    assert monitor.snapshot() == []
    monitor.observe(rec(version="canary"))
    rows = monitor.snapshot()
    assert {r.feature for r in rows} == {"prompt_length", "output_length", "finish_reason",
                                         "ttft"}  # entropy: 51 of 100 carried one
    assert all(r.version == "canary" and r.current_n == 100 for r in rows)


def test_key_cap_counts_overflow_and_reuses_idle_keys():
    monitor = drift.DriftMonitor("pinned", window_s=60, slots=6, max_keys=2, clock=Clock())
    monitor.observe(rec(version="v1"))
    monitor.observe(rec(version="v2", end_s=30))
    monitor.observe(rec(version="v3", end_s=40))
    assert monitor.overflow_records == 1
    monitor.observe(rec(version="v3", end_s=65))  # v1 idle a full window: its slot is freed
    assert monitor.overflow_records == 1
    assert sum(monitor.counts("m", "v1")["ttft"]) == 0


def test_pinned_baseline_freezes_first_full_window_with_enough_samples():
    clock = Clock()
    monitor = drift.DriftMonitor("pinned", window_s=60, slots=6, min_samples=50, clock=clock)
    for i in range(120):
        monitor.observe(rec(end_s=i / 2, prompt=100))  # t 0..59.5: the first window
        monitor.observe(rec(model="quiet", end_s=i / 2))
        if i % 4 == 0:
            monitor.observe(rec(model="sparse", end_s=i / 2))  # 30 < min_samples
    clock.now = 59.9
    assert monitor.snapshot() == []  # the first window is not complete yet
    for i in range(120):
        monitor.observe(rec(end_s=60 + i / 2, prompt=3000))  # the next window: longer prompts
        if i % 2 == 0:
            monitor.observe(rec(model="sparse", end_s=60 + i / 2))
    clock.now = 119.9
    rows = {(r.model, r.feature): r for r in monitor.snapshot()}
    shifted = rows[("m", "prompt_length")]
    assert (shifted.baseline_n, shifted.current_n) == (120, 120) and shifted.psi > 0.25
    assert rows[("m", "ttft")].psi < 0.1
    assert not any(m == "quiet" for m, _ in rows)  # no record after its window: not frozen
    # sparse: 30 requests in 0..60 s, too few; the window 40..100 s is the first with 50
    sparse = rows[("sparse", "ttft")]
    assert (sparse.baseline_n, sparse.current_n) == (50, 60)


def test_version_baseline_compares_canary_with_live_stable():
    clock = Clock(10.0)
    monitor = drift.DriftMonitor("version:v1", min_samples=10, clock=clock)
    for _ in range(20):
        monitor.observe(rec(version="v1", output=50))
        monitor.observe(rec(version="v2", output=5000))
        monitor.observe(rec(model="other", version="v2"))  # no v1 of that model
    rows = monitor.snapshot()
    assert {(r.model, r.version) for r in rows} == {("m", "v2")}
    out = next(r for r in rows if r.feature == "output_length")
    assert out.psi > 1 and (out.baseline_n, out.current_n) == (20, 20)
    clock.now = 10 + 1800  # stable's traffic ages out: nothing to compare against
    assert monitor.snapshot() == []


def test_file_baseline_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    saver = drift.DriftMonitor(clock=Clock(1.0))
    feed(saver, "v1", sample(rng, 1000, "none"))
    path = tmp_path / "baseline.json"
    saver.save_baseline(path)
    doc = json.loads(path.read_text())
    assert doc["models"]["m"]["ttft"]["edges"] == list(drift.TTFT_EDGES)
    doc["models"]["*"] = doc["models"].pop("m")  # any model
    path.write_text(json.dumps(doc))
    monitor = drift.DriftMonitor(f"file:{path}", clock=Clock(1.0))
    feed(monitor, "v7", sample(rng, 1000, "none"))
    rows = monitor.snapshot()
    assert len(rows) == 5 and all(r.baseline_n == r.current_n == 1000 for r in rows)
    assert all(r.psi < 0.1 for r in rows)
    base = drift.load_baseline(path)["*"]
    assert base == [saver.counts("m", "v1")[f.name] for f in drift.FEATURES]


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda d: d["models"]["m"]["ttft"].update(edges=[0.001, 1.0]), "edges"),
    (lambda d: d["models"]["m"]["finish_reason"].update(categories=["stop"]), "categories"),
    (lambda d: d["models"]["m"].update(latency={"edges": [], "counts": [1]}),
     "unknown feature"),
    (lambda d: d["models"]["m"]["prompt_length"]["counts"].__setitem__(0, -3), "negative"),
    (lambda d: d["models"]["m"]["prompt_length"].update(counts=[1, 2]), "17 integers"),
    (lambda d: d.pop("models"), "'models'"),
])
def test_bad_baseline_file_names_file_and_problem(tmp_path, mutate, problem):
    path = tmp_path / "bad.json"
    saver = drift.DriftMonitor(clock=Clock(1.0))
    saver.observe(rec())
    saver.save_baseline(path)
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=problem) as err:
        drift.DriftMonitor(f"file:{path}")
    assert str(path) in str(err.value)


def test_unreadable_baseline_and_bad_spec(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON") as err:
        drift.load_baseline(path)
    assert str(path) in str(err.value)
    for spec in ("pinned:x", "file:", "version:", "latest"):
        with pytest.raises(ValueError, match="expected 'pinned'"):
            drift.DriftMonitor(spec)


def test_request_record_without_entropy_counts_other_features():
    record = RequestRecord(source="llmtrace", trace_id="t", request_id="r", model="m",
                           tenant="t", version="v1", finish_reason="tool_calls",
                           error_type=None, start_ns=0, end_ns=10**9, e2e_s=1.0,
                           ttft_s=None, prompt_tokens=33000, output_tokens=0)
    monitor = drift.DriftMonitor(clock=Clock(1.0))
    monitor.observe(record)
    counts = monitor.counts("m", "v1")
    assert counts["output_entropy"] == [0] * 17 and sum(counts["ttft"]) == 0
    assert counts["prompt_length"][-1] == 1 and counts["output_length"][0] == 1
    assert counts["finish_reason"][drift.FINISH_REASONS.index("other")] == 1


def test_the_collector_publishes_canary_drift_against_the_stable_window():
    """The collector's output: records of two versions, baseline ``version:stable``;
    the canary's shifted prompts show on /metrics as PSI, KL, chi-squared, p and counts."""
    from prometheus_client import generate_latest

    from llmtrace.collector.config import CollectorConfig
    from llmtrace.pipeline.metrics import DerivedMetrics
    from llmtrace.quality.drift import monitor_for

    config = CollectorConfig(drift_baseline="version:stable", drift_min_samples=50)
    metrics = DerivedMetrics(drift=monitor_for(config))
    rng = np.random.default_rng(3)
    now = time.time_ns()
    for version, mean in (("stable", 40), ("canary", 400)):
        for i, tokens in enumerate(rng.poisson(mean, 200)):
            metrics.observe(RequestRecord(
                source="llmtrace", trace_id=f"{i:032x}", request_id=str(i), model="m",
                tenant="t", version=version, finish_reason="stop", error_type=None,
                start_ns=now - 10**9, end_ns=now, e2e_s=1.0, ttft_s=0.05,
                prompt_tokens=int(tokens), output_tokens=8))
    text = generate_latest(metrics.registry).decode()
    psi = [line for line in text.splitlines() if line.startswith("llmtrace_drift_psi{")
           and 'llmtrace_drift_feature="prompt_length"' in line]
    assert len(psi) == 1 and 'llmtrace_deployment_version="canary"' in psi[0], psi
    assert float(psi[0].rsplit(" ", 1)[1]) > 0.25
    assert 'llmtrace_drift_samples{gen_ai_request_model="m",llmtrace_deployment_version=' \
        '"canary",llmtrace_drift_feature="prompt_length",llmtrace_drift_window="current"} 200.0' \
        in text
    for name in ("llmtrace_drift_kl_divergence{", "llmtrace_drift_chi_squared{",
                 "llmtrace_drift_p_value{"):
        assert name in text
