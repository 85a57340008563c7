# vLLM with llmtrace installed beside it. Installing changes nothing by itself: the
# Deployment switches llmtrace on with LLMTRACE_ENABLED=1 (vLLM's plugin entry point
# loads it in the API server, the engine core and the workers).
#
#   docker build -f examples/deployment/images/vllm-llmtrace.Dockerfile \
#     -t ghcr.io/example/vllm-llmtrace:v0.32.0-llmtrace0.2.0 examples/deployment/images
#
# llmtrace depends on no vLLM build and never replaces the image's vLLM; the
# `nvidia` extra adds NVML bindings for the engine core's hw.gpu.* metrics
# (docs/hardware.md). vLLM versions llmtrace is checked against: docs/compatibility.md.
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

# Keep in step with pyproject.toml's version (tests/test_deployment_kubernetes.py).
ARG LLMTRACE_VERSION=0.2.0

RUN python3 -m pip install --no-cache-dir "llmtrace-otel[nvidia]==${LLMTRACE_VERSION}" \
 && python3 -c "import importlib.metadata as m, llmtrace; \
assert any(e.name == 'llmtrace' for e in m.entry_points(group='vllm.general_plugins')), \
'llmtrace plugin entry point missing'"

# The image's own entry point (`vllm serve`) stays; the Deployment passes the model.
