# llmtrace's own image: `llmtrace collector` by default, and every other `llmtrace`
# subcommand (`gate` for the Argo Rollouts Job template, `doctor`, `assets`).
#
#   docker build -f examples/deployment/images/llmtrace.Dockerfile \
#     -t ghcr.io/example/llmtrace:0.2.0 examples/deployment/images
#
# From a source checkout instead of PyPI: build with the repository root as the
# context and replace the pip line with `COPY . /src` + `pip install /src`.
# The Kubernetes manifests (examples/deployment/kubernetes/) run it as the
# `llmtrace-collector` StatefulSet: OTLP gRPC 4317, OTLP HTTP 4318, /metrics and
# /healthz on 8889 (llmtrace/collector/config.py).
FROM python:3.11-slim

# Keep in step with pyproject.toml's version (tests/test_deployment_kubernetes.py).
ARG LLMTRACE_VERSION=0.2.0

RUN pip install --no-cache-dir "llmtrace-otel==${LLMTRACE_VERSION}" \
 && useradd --system --uid 10001 --no-create-home llmtrace

USER 10001
EXPOSE 4317 4318 8889
ENTRYPOINT ["llmtrace"]
CMD ["collector"]
