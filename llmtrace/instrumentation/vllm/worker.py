"""Worker side of a sampled engine step: its timings, profiling regions and MoE routing.

The engine core samples one step in ``step_sample_every`` and marks that step's
scheduler output (:data:`STEP_MARK`, the step span's trace id). The worker, which
runs the model in its own process, sees the mark in ``execute_model``; for a marked
step it times ``execute_model`` and ``sample_tokens``, records vLLM's profiling
scopes and ``llmtrace.region()`` blocks (:mod:`llmtrace.profiling.regions`), counts
the MoE routing of the step's tokens, and puts all of it, as plain numbers, on the
step's model-runner output (:data:`OUTPUT_KEY`), which vLLM sends back to the engine
core. The engine core builds the spans and metrics (:mod:`.steps`). Unmarked steps
cost one attribute lookup here.

**MoE routing.** vLLM's router calls ``BaseRouter.capture_fn(topk_ids)`` with each
layer's top-k logical expert ids (before an expert-parallel load balancer maps them
to physical experts): the hook vLLM's own routed-experts capturer uses. llmtrace's
callback copies the ids into a preallocated ``[tokens, layers, top_k]`` buffer,
tensor operations only, so torch.compile traces it into the graph (on CPU, Dynamo
traces through the router) and eager mode runs it as is; it chains to a callback
already set. A marked step's first ``total_num_scheduled_tokens`` rows are its
tokens (padding, as CUDA graphs add it, sits after them) and are counted once,
after the forward, into per-layer expert histograms.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from llmtrace.config import Config
from llmtrace.profiling.regions import RECORDER, VLLMScope

logger = logging.getLogger("llmtrace")

#: attribute on vLLM's SchedulerOutput: the sampled step's (trace id, step index)
STEP_MARK = "llmtrace_step"
#: attribute on vLLM's ModelRunnerOutput: the worker's record of a marked step (a dict)
OUTPUT_KEY = "llmtrace_step"


class ExpertCounts:
    """The routing buffer every MoE layer's capture callback writes into."""

    def __init__(self, layer_ids: list[int], num_experts: int, top_k: int, max_tokens: int,
                 device: Any) -> None:
        import torch

        self.layer_ids = layer_ids
        self.num_experts = num_experts
        self.top_k = top_k
        self.max_tokens = max_tokens
        dtype = torch.int16 if num_experts < 2 ** 15 else torch.int32
        self.ids = torch.zeros((max_tokens, len(layer_ids), top_k), dtype=dtype,
                               device=device)
        self.previous: list[Any] = [None] * len(layer_ids)

    def capture(self, slot: int, topk_ids) -> None:
        """One layer's routing: runs inside the (possibly compiled) forward."""
        previous = self.previous[slot]
        if previous is not None:
            previous(topk_ids)
        self.ids[: topk_ids.shape[0], slot] = topk_ids

    def read(self, tokens: int) -> list[list[int]]:
        """Per layer, assignments per expert over the first ``tokens`` rows (worker thread,
        after the forward; one small device-to-host copy)."""
        import torch

        n = min(tokens, self.max_tokens)
        layers = len(self.layer_ids)
        flat = self.ids[:n].permute(1, 0, 2).reshape(layers, -1).long()
        counts = torch.zeros((layers, self.num_experts), dtype=torch.int64,
                             device=flat.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        return counts.cpu().tolist()

    def describe(self) -> dict[str, Any]:
        return {"layers": self.layer_ids, "experts": self.num_experts, "top_k": self.top_k}


def _moe_routers(model: Any) -> list[tuple[int, Any, int, int]]:
    """(layer id, router, experts, top_k) for each MoE layer whose router takes a
    capture callback, found the way vLLM's routed-experts capturer finds them."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    found = []
    for module in model.modules():
        router = getattr(module, "router", None)
        if not isinstance(router, BaseRouter) or not hasattr(router, "set_capture_fn"):
            continue
        layer_id = getattr(module, "layer_id", None)
        moe = getattr(module, "moe_config", None) or getattr(router, "moe_config", None)
        # the callback sees logical ids (before an expert-parallel balancer maps them)
        experts = getattr(moe, "num_logical_experts", None) or getattr(moe, "num_experts",
                                                                         None)
        top_k = getattr(moe, "experts_per_token", None) or getattr(router, "top_k", None)
        if layer_id is None or not experts or not top_k:
            continue
        found.append((int(layer_id), router, int(experts), int(top_k)))
    return sorted(found, key=lambda f: f[0])


class WorkerTracer:
    """Per worker process state; the hooks run on the worker's execute thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.moe: ExpertCounts | None = None
        self._step: dict[str, Any] | None = None  # the marked step under way
        self._scope: VLLMScope | None = None
        self._owns_regions = False
        self._sampling = config.step_sample_every > 0

    # -- start-up: after the model is loaded, before it is compiled or warmed up -----
    def after_load_model(self, instance, args, kwargs, result, token) -> None:
        self._install_scopes()
        if self.config.moe_counts and self.config.step_sample_every:
            self._install_moe(instance)

    def _install_scopes(self) -> None:
        try:
            import vllm.v1.utils as vutils
        except ImportError:
            return
        if not hasattr(vutils, "_PROFILER_FUNC"):
            logger.warning("llmtrace: hook vllm.worker.load_model: vllm.v1.utils has no "
                           "_PROFILER_FUNC; vLLM's profiling scopes are not recorded")
            return
        current = vutils._PROFILER_FUNC
        if isinstance(current, VLLMScope):
            return
        self._scope = VLLMScope(current)
        vutils._PROFILER_FUNC = self._scope

    def _install_moe(self, worker: Any) -> None:
        runner = getattr(worker, "model_runner", None)
        model = runner.get_model() if runner is not None else None
        if model is None:
            return
        routers = _moe_routers(model)
        if not routers:
            return  # a dense model: nothing to count
        vcfg = getattr(worker, "vllm_config", None)
        parallel = getattr(vcfg, "parallel_config", None)
        if getattr(parallel, "data_parallel_size", 1) > 1:
            # naive expert-parallel dispatch gathers every rank's tokens before routing:
            # this rank's rows are not the first ones
            logger.info("llmtrace: MoE expert counts are not taken with data parallelism "
                        "(size %s) in this version", parallel.data_parallel_size)
            return
        experts = {r[2] for r in routers}
        top_ks = {r[3] for r in routers}
        if len(experts) != 1 or len(top_ks) != 1:
            logger.info("llmtrace: MoE layers differ in experts %s or top_k %s; expert "
                        "counts are not taken", sorted(experts), sorted(top_ks))
            return
        max_tokens = int(getattr(getattr(vcfg, "scheduler_config", None),
                                 "max_num_batched_tokens", 0) or 0)
        if max_tokens <= 0:
            return
        weight = next(iter(model.parameters()), None)
        device = weight.device if weight is not None else "cpu"
        counts = ExpertCounts([r[0] for r in routers], experts.pop(), top_ks.pop(),
                              max_tokens, device)
        for slot, (_layer, router, _e, _k) in enumerate(routers):
            counts.previous[slot] = router.capture_fn
            router.set_capture_fn(functools.partial(counts.capture, slot))
        self.moe = counts
        logger.info("llmtrace: counting MoE routing in %d layers (%d experts, top-%d)",
                    len(routers), counts.num_experts, counts.top_k)

    # -- each step (hook bodies; guarded by install()) -------------------------------
    def sampling(self) -> bool:
        """The step hooks' gate: with step sampling off they skip their bodies."""
        return self._sampling

    def before_execute_model(self, instance, args, kwargs) -> None:
        out = args[0] if args else kwargs.get("scheduler_output")
        mark = getattr(out, STEP_MARK, None)
        if mark is None:
            self._step = None
            return
        trace_id, step_index = mark
        # in-process workers (one GPU, UniProcExecutor) run on the engine core's thread,
        # whose step already records regions: the engine core takes them all
        self._owns_regions = not RECORDER.thread
        if self._owns_regions:
            RECORDER.begin(trace_id)
        self._step = {"index": step_index, "tokens": out.total_num_scheduled_tokens,
                      "execute": [time.time_ns(), 0]}

    def after_execute_model(self, instance, args, kwargs, result, token) -> None:
        step = self._step
        if step is None:
            return
        step["execute"][1] = time.time_ns()
        if result is not None:  # sampled in execute_model: the step is complete
            self._finish(result)

    def before_sample_tokens(self, instance, args, kwargs) -> None:
        if self._step is not None:
            self._step["sample"] = [time.time_ns(), 0]

    def after_sample_tokens(self, instance, args, kwargs, result, token) -> None:
        step = self._step
        if step is None or "sample" not in step:
            return
        step["sample"][1] = time.time_ns()
        self._finish(result)

    def _finish(self, result: Any) -> None:
        step, self._step = self._step, None
        if self._owns_regions:
            regions, overflow = RECORDER.end()
            step["regions"] = regions
            if overflow:
                step["regions_dropped"] = overflow
        moe = self.moe
        if moe is not None:
            step["moe"] = moe.describe()
            step["moe"]["counts"] = moe.read(step["tokens"])
        _attach(result, step)


def _attach(result: Any, step: dict[str, Any]) -> None:
    """Put the step's record on the output vLLM sends to the engine core."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if isinstance(result, ModelRunnerOutput):
        if result is not EMPTY_MODEL_RUNNER_OUTPUT:  # a shared singleton: never touched
            setattr(result, OUTPUT_KEY, step)
        return
    get_output = getattr(result, "get_output", None)
    if callable(get_output):  # async scheduling: the output is made later, on its thread

        def get_output_with_step():
            out = get_output()
            if isinstance(out, ModelRunnerOutput) and out is not EMPTY_MODEL_RUNNER_OUTPUT:
                setattr(out, OUTPUT_KEY, step)
            return out

        result.get_output = get_output_with_step
