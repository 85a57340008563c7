"""The API server's part of the quality loop: what the request hooks hand it.

On the serving path (``on_begin``, inside the add_request hook) only decisions
by trace id and references: whether this traced request is judged (its prompt
text kept in memory), and whether llmtrace asks vLLM for top-k logprobs to
measure output entropy. Everything else runs on the builder thread
(``on_record``): the entropy from the logprobs, the regeneration check on a
keyed hash of the prompt's token ids, and the hand-off to the judge worker,
whose verdicts come back to the builder to become the ``llmtrace.judge`` span
and the evaluation metrics. Prompt and completion text go nowhere but the
judge endpoint the operator configured, and are dropped after the call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmtrace.config import Config
from llmtrace.quality import verdicts
from llmtrace.quality.entropy import mean_entropy
from llmtrace.quality.judge import (
    JUDGE_QUEUE_FULL,
    JudgeWorker,
    Judgment,
    Verdict,
    judge_sampled,
)
from llmtrace.quality.regenerations import RegenerationTracker
from llmtrace.telemetry import DROPPED, log_drop

logger = logging.getLogger("llmtrace")


class QualityHooks:
    """Judge sampling, entropy logprobs and regenerations for one API server process."""

    def __init__(self, config: Config, telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.judge: JudgeWorker | None = None
        self.regenerations = RegenerationTracker(config.regeneration_window_s)
        self._judge_ratio = config.judge_sample_ratio
        self._entropy_ratio = config.entropy_sample_ratio
        self._top_k = 0  # set by start(): entropy_top_k within vLLM's max_logprobs

    def start(self, model_config: Any) -> None:
        """Engine client up: the logprobs limit is known; the judge worker starts."""
        limit = getattr(model_config, "max_logprobs", 20)
        limit = self.config.entropy_top_k if limit is None or limit < 0 else int(limit)
        self._top_k = min(self.config.entropy_top_k, limit)
        if self.config.judge_endpoint and self.judge is None:
            self.judge = self._start_judge()

    def _start_judge(self) -> JudgeWorker | None:
        c = self.config
        try:
            rubric = Path(c.judge_rubric).read_text() if c.judge_rubric else None
            return JudgeWorker(c.judge_endpoint, c.judge_model, on_verdict=self._on_verdict,
                               rubric=rubric, timeout_s=c.judge_timeout_s,
                               max_rate=c.judge_max_rate, concurrency=c.judge_concurrency,
                               queue_size=c.judge_queue_size,
                               api_key=c.judge_api_key.get_secret_value() or None)
        except (OSError, ValueError) as exc:  # the judge is off; serving is not affected
            logger.warning("llmtrace: judge disabled: %s", exc)
            return None

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()
            self.judge = None

    # -- serving path: decisions by trace id, references only ---------------------
    def on_begin(self, rec: Any, prompt: str | None) -> None:
        """A traced request starts: judge it? ask for logprobs?"""
        if self.judge is not None and prompt and judge_sampled(rec.trace_id, self._judge_ratio):
            rec.judged, rec.judge_prompt = True, prompt
        params = rec.params
        if params is None:
            return
        asked = params.logprobs
        if asked is not None:
            rec.entropy = asked != 0  # the sampled token alone bounds nothing
        elif self._top_k > 0 and judge_sampled(rec.trace_id, self._entropy_ratio):
            # read by vLLM when the output processor takes the request, right after this
            # hook; the OpenAI responses show logprobs only where the client asked
            params.logprobs = self._top_k
            rec.entropy = True

    # -- builder thread ------------------------------------------------------------
    def on_record(self, rec: Any, record: Any) -> None:
        """Fill the record's quality fields; hand a judged request to the judge."""
        if rec.logprobs is not None:
            record.output_entropy = mean_entropy(rec.logprobs)
            rec.logprobs = None
        http = rec.http
        if not (http is not None and http.continuation):  # a continuation is no retry
            record.regeneration = self.regenerations.seen(rec.tenant, rec.prompt_ids,
                                                          rec.timeline.read_ns)
        rec.prompt_ids = None
        judge = self.judge
        if rec.judged and judge is not None:
            if rec.completion and record.error_type is None:
                keep = judge.max_chars + 1  # what the judge sends, and that it was cut:
                # a queue of huge prompts must not hold more than that in memory
                judgment = Judgment(rec.trace_id, rec.span_id, rec.request_id, record.model,
                                    record.tenant, record.version, rec.judge_prompt[:keep],
                                    rec.completion[:keep], record.finish_reason)
                if not judge.submit(judgment):
                    DROPPED[JUDGE_QUEUE_FULL] += 1
                    log_drop(JUDGE_QUEUE_FULL, "the judge is behind; judged requests wait "
                             f"in a queue of {self.config.judge_queue_size}",
                             "requests sampled for the judge")
            rec.judge_prompt = rec.completion = None

    def _on_verdict(self, verdict: Verdict) -> None:
        """A judge thread: the verdict is built on the builder thread."""
        self.telemetry.builder.submit(self._build_verdict, verdict)

    def _build_verdict(self, verdict: Verdict) -> None:
        judge_model = self.config.judge_model
        verdicts.emit_span(self.telemetry, verdict, judge_model, self.config.capture_content)
        if self.config.metrics_enabled:
            instruments = self.telemetry.instruments
            for record in verdicts.records(verdict, judge_model):
                instruments.record_evaluation(record)
