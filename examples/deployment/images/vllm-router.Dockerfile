# vllm-router (PyPI `vllm-router`, the vLLM project's Rust router; a binary in a wheel)
# in front of the vLLM pods. docs/routers.md says what it forwards to llmtrace.
#
#   docker build -f examples/deployment/images/vllm-router.Dockerfile \
#     -t ghcr.io/example/vllm-router:0.1.17 examples/deployment/images
FROM python:3.11-slim

# The version the test bed checks (testbed/router.py, docs/routers.md).
ARG VLLM_ROUTER_VERSION=0.1.17

RUN pip install --no-cache-dir "vllm-router==${VLLM_ROUTER_VERSION}" \
 && useradd --system --uid 10001 --no-create-home router

USER 10001
# 30000: the OpenAI-compatible API; 29000: Prometheus metrics (--prometheus-port)
EXPOSE 30000 29000
ENTRYPOINT ["vllm-router"]
