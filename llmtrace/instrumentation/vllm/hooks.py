"""The vLLM hook table as data: what llmtrace patches, where, and on which versions.

This module imports nothing from vLLM (nor from the OpenTelemetry SDK), so the
runtime installer, ``llmtrace doctor`` and the static compatibility check
(``scripts/vllm_compat.py``, which reads released wheels' sources without
importing them) all read the same table.

Each hook lists one or more :class:`Target` s, tried in order: the first whose
callable resolves and whose leading parameters match is wrapped. A release that
moved a module or renamed a parameter gets its own target here, so one table
serves every supported version; a hook none of whose targets match is disabled
on its own (one warning naming hook, targets and installed vLLM version), and
the others still run. The version gate is this table, not a version range.

``Target.params`` are the parameters the hook bodies read, in order, right
after ``self``: the bodies index ``args`` by position, so a parameter inserted
before them would silently shift every read. They must therefore be a prefix
of the target's positional parameters; a mismatch disables the hook.
"""

from __future__ import annotations

from llmtrace.instrumentation.targets import Fields, HookSpec, Target

#: releases the compatibility matrix (docs/compatibility.md) was built from; a
#: vLLM outside this list still runs every hook that resolves, with one notice
CHECKED_RELEASES = ("0.30.0", "0.31.0", "0.32.0", "0.33.0")


_OP = "vllm.v1.engine.output_processor"
_CLIENT = "vllm.v1.engine.core_client"
_SCHED = "vllm.v1.core.sched.scheduler"
_RELEASED = ">=0.30"

_ENGINE_REQUEST = Fields("vllm.v1.engine", "EngineCoreRequest",
                         ("request_id", "arrival_time", "trace_headers", "sampling_params",
                          "prompt_token_ids"))
_SAMPLING = Fields("vllm.sampling_params", "SamplingParams",
                   ("max_tokens", "temperature", "top_p", "top_k", "seed", "n",
                    "frequency_penalty", "presence_penalty", "logprobs"))
_REQUEST = Fields("vllm.v1.request", "Request", ("request_id", "trace_headers"))
_WORKER = "vllm.v1.worker.gpu_worker"  # the CPU worker subclasses it
_KV = "vllm.distributed.kv_transfer.kv_connector"
_KV_BASE = f"{_KV}.v1.base"


def _connector(name: str, attr: str, params: tuple[str, ...], why: str,
               reads: tuple[Fields, ...] = ()) -> HookSpec:
    """A KV connector method, wrapped on each connector vLLM creates (any class)."""
    return HookSpec(name, "engine-core", (Target(_KV_BASE, attr, params, _RELEASED),), why,
                    reads, per_instance=True)

HOOKS: tuple[HookSpec, ...] = (
    HookSpec("uvicorn.httptools.data_received", "api-server", (
        Target("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol.data_received",
               ("data",), "uvicorn >=0.30"),),
        "the moment a request's first bytes are read (TTFT's start)"),
    HookSpec("uvicorn.h11.data_received", "api-server", (
        Target("uvicorn.protocols.http.h11_impl", "H11Protocol.data_received",
               ("data",), "uvicorn >=0.30"),),
        "the same, when uvicorn runs the h11 parser"),
    HookSpec("vllm.api_server.build_app", "api-server", (
        Target("vllm.entrypoints.launchers.api_server.entry", "build_app", (), _RELEASED),
        # vLLM main moved the API server under vllm.frontend and left a shim behind
        Target("vllm.frontend.entrypoints.launchers.api_server.entry", "build_app", (),
               ">0.33.0"),),
        "the ASGI middleware that opens llmtrace.request and sees the first byte written"),
    HookSpec("vllm.async_llm.init", "api-server", (
        Target("vllm.v1.engine.async_llm", "AsyncLLM.__init__", (), _RELEASED),),
        "the model name, engine settings and vLLM's own tracing switch",
        (Fields("vllm.v1.engine.async_llm", "AsyncLLM", ("model_config",)),)),
    HookSpec("vllm.output_processor.add_request", "api-server", (
        Target(_OP, "OutputProcessor.add_request", ("request", "prompt"), _RELEASED),),
        "a request's hand-off to the engine (engine arrival) and its prompt size; the "
        "quality loop's judge and entropy sampling (llmtrace.quality)",
        (_ENGINE_REQUEST, _SAMPLING, Fields(_OP, "OutputProcessor", ("request_states",)),
         # read at finish: the completion for the judge, the logprobs for the entropy
         Fields(_OP, "RequestState", ("detokenizer", "logprobs_processor")),
         Fields("vllm.v1.engine.logprobs", "LogprobsProcessor", ("logprobs",)))),
    HookSpec("vllm.output_processor.process_outputs", "api-server", (
        Target(_OP, "OutputProcessor.process_outputs",
               ("engine_core_outputs", "engine_core_timestamp"), _RELEASED),),
        "tokens, scheduler events (queued/scheduled/preempted) and finish",
        (Fields("vllm.v1.engine", "EngineCoreOutput",
                ("request_id", "events", "new_token_ids", "finish_reason")),
         Fields("vllm.v1.engine", "EngineCoreEvent", ("type", "timestamp")))),
    HookSpec("vllm.output_processor.abort_requests", "api-server", (
        Target(_OP, "OutputProcessor.abort_requests", (), _RELEASED),),
        "client disconnects and aborts"),
    HookSpec("vllm.output_processor.propagate_error", "api-server", (
        Target(_OP, "OutputProcessor.propagate_error", ("e",), _RELEASED),),
        "engine failures, ending every open request as an error"),
    HookSpec("vllm.dp.choose_rank", "api-server", (
        Target(_CLIENT, "DPLBAsyncMPClient.get_core_engine_for_request", ("request",),
               _RELEASED),),
        "the data-parallel rank vLLM's balancer picks, and the per-rank loads it picked from",
        (Fields(_CLIENT, "DPLBAsyncMPClient",
                ("lb_engines", "core_engines", "reqs_in_flight")),)),
    HookSpec("vllm.dp.single_rank", "api-server", (
        Target(_CLIENT, "DPAsyncMPClient.get_core_engine_for_request", ("request",),
               _RELEASED),),
        "the rank of an API server that drives one engine core (external load balancing)"),
    HookSpec("vllm.scheduler.init", "engine-core", (
        Target(_SCHED, "Scheduler.__init__", (), _RELEASED),),
        "the served model's name and the engine's accelerator for cost",
        (Fields(_SCHED, "Scheduler", ("vllm_config",)),)),
    HookSpec("vllm.scheduler.add_request", "engine-core", (
        Target(_SCHED, "Scheduler.add_request", ("request",), _RELEASED),),
        "the engine-side request span's start", (_REQUEST,)),
    HookSpec("vllm.scheduler.schedule", "engine-core", (
        Target(_SCHED, "Scheduler.schedule", (), _RELEASED),),
        "each step's start: prefill chunks begin when they are scheduled",
        (Fields("vllm.v1.core.sched.output", "SchedulerOutput",
                ("num_scheduled_tokens", "total_num_scheduled_tokens")),
         Fields(_SCHED, "Scheduler", ("requests",)),
         Fields("vllm.v1.request", "Request", ("num_computed_tokens", "num_prompt_tokens")))),
    HookSpec("vllm.scheduler.update_from_output", "engine-core", (
        Target(_SCHED, "Scheduler.update_from_output",
               ("scheduler_output", "model_runner_output"), _RELEASED),),
        "each step's end: prefill chunk tokens, batch composition, cached tokens; KV loads "
        "that failed in the step (vLLM frees those requests before telling the connector)"),
    HookSpec("vllm.scheduler.preempt_request", "engine-core", (
        Target(_SCHED, "Scheduler._preempt_request", ("request",), _RELEASED),),
        "preemptions (an event on the engine-side span)", (_REQUEST,)),
    HookSpec("vllm.scheduler.free_request", "engine-core", (
        Target(_SCHED, "Scheduler._free_request", ("request",), _RELEASED),),
        "the engine-side span's end and the request's batch-share cost", (_REQUEST,)),
    HookSpec("vllm.kv.create_connector", "engine-core", (
        Target(f"{_KV}.factory", "KVConnectorFactory.create_connector",
               ("config", "role", "kv_cache_config"), _RELEASED),),
        "each KV connector vLLM creates (scheduler or worker side, any class): its name, "
        "bytes per block, and the per-connector hooks below",
        (Fields("vllm.v1.kv_cache_interface", "KVCacheConfig", ("kv_cache_groups",)),
         Fields("vllm.v1.kv_cache_interface", "KVCacheGroupSpec",
                ("layer_names", "kv_cache_spec")))),
    HookSpec("vllm.worker.load_model", "worker", (
        Target(_WORKER, "Worker.load_model", (), _RELEASED),),
        "after the model loads, before it is compiled: a capture callback on each MoE "
        "router (tensor copies only) and vLLM's profiling scopes",
        (Fields("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter",
                ("capture_fn",)),)),
    HookSpec("vllm.worker.execute_model", "worker", (
        Target(_WORKER, "Worker.execute_model", ("scheduler_output",), _RELEASED),),
        "a sampled step's forward: its time, profiling regions and MoE expert counts, "
        "returned to the engine core on the step's output"),
    HookSpec("vllm.worker.sample_tokens", "worker", (
        Target(_WORKER, "Worker.sample_tokens", ("grammar_output",), _RELEASED),),
        "a sampled step's deferred sampling: its time"),
    _connector("vllm.kv.matched_tokens", "KVConnectorBase_V1.get_num_new_matched_tokens",
               ("request", "num_computed_tokens"),
               "external tokens the connector will load for a request, and whether "
               "asynchronously"),
    _connector("vllm.kv.update_state_after_alloc",
               "KVConnectorBase_V1.update_state_after_alloc",
               ("request", "blocks", "num_external_tokens"),
               "a load's start: the blocks allocated for the external tokens",
               (Fields("vllm.v1.core.kv_cache_manager", "KVCacheBlocks", ("blocks",)),)),
    _connector("vllm.kv.request_finished", "KVConnectorBase_V1.request_finished",
               ("request", "block_ids"), "a save's start: the blocks held for the peer"),
    _connector("vllm.kv.request_finished_all_groups",
               "SupportsHMA.request_finished_all_groups", ("request", "block_ids"),
               "the same for connectors that handle several KV-cache groups"),
    _connector("vllm.kv.update_connector_output", "KVConnectorBase_V1.update_connector_output",
               ("connector_output",),
               "transfers' ends: requests received, sent or failed, as the workers report",
               (Fields("vllm.v1.outputs", "KVConnectorOutput",
                       ("finished_sending", "finished_recving", "invalid_block_ids")),)),
    _connector("vllm.kv.start_load_kv", "KVConnectorBase_V1.start_load_kv",
               ("forward_context",), "worker side: time to start each step's loads"),
    _connector("vllm.kv.wait_for_save", "KVConnectorBase_V1.wait_for_save", (),
               "worker side: time each step blocks on saves"),
    _connector("vllm.kv.get_finished", "KVConnectorBase_V1.get_finished",
               ("finished_req_ids",), "worker side: time polling for finished transfers"),
)

SPECS = {spec.name: spec for spec in HOOKS}

#: Hooks that share per-request state, per process. When one of them fails at run
#: time, the whole group is disabled and its state released: a request that one hook
#: opens and a disabled one would close must not accumulate (about 10 KB each). The
#: first tuple holds the members without which the group cannot work; if one of them
#: is missing at start-up, the whole group is disabled then. The second holds the
#: members whose absence only loses their events (aborts, engine failures). Hooks that
#: only add to another hook's state (the data-parallel rank choice) own nothing and
#: belong to no group: their failure loses their own figures only.
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "api-server.requests": (
        ("vllm.output_processor.add_request", "vllm.output_processor.process_outputs"),
        ("vllm.output_processor.abort_requests", "vllm.output_processor.propagate_error")),
    "engine-core.requests": (
        ("vllm.scheduler.add_request", "vllm.scheduler.free_request"),
        ("vllm.scheduler.schedule", "vllm.scheduler.update_from_output",
         "vllm.scheduler.preempt_request")),
    # transfers opened by the alloc or finished hooks are closed by the output hook (or
    # released when vLLM frees the request: free_request, in the group above)
    "engine-core.kv_transfers": (
        ("vllm.kv.create_connector", "vllm.kv.update_connector_output"),
        ("vllm.kv.matched_tokens", "vllm.kv.update_state_after_alloc",
         "vllm.kv.request_finished", "vllm.kv.request_finished_all_groups")),
}
