"""vLLM ``general_plugins`` entry point: runs in every vLLM process.

vLLM calls :func:`register` once per process (API server, engine core, each
worker, the model-inspection subprocess). Installing llmtrace alone changes
nothing: it activates only on an explicit switch (``LLMTRACE_ENABLED=1``) or an
OTLP endpoint in the environment, and ``LLMTRACE_ENABLED=0`` always wins, as do
``OTEL_SDK_DISABLED=true`` and ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=vllm``
(see :func:`llmtrace.config.switched_off`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("llmtrace")


def register() -> None:
    try:
        from llmtrace.config import activation_requested

        if not activation_requested():
            return
        import llmtrace

        llmtrace.instrument()
    except Exception as exc:  # noqa: BLE001 - a plugin must never stop vLLM from starting
        logger.warning("llmtrace: not activated: %s", exc)
