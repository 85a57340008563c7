"""Price tables for cost attribution: USD per token and per accelerator-hour.

A price table is a small YAML file an operator maintains (see
``examples/prices.yaml``). It is validated strictly on load, because a typo in a
price silently skews every cost figure after it; lookups afterwards never raise,
because they run once per request on the hot path and an unpriced model is a
reportable fact, not an error.

It sits at the top of the package, not in :mod:`llmtrace.pipeline`, because
both sides read it: the SDK (``LLMTRACE_PRICES``, costing at the source) and the
derivation pipeline; the SDK should not import the collector side for it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

#: Distinct model names whose price lookup is memoized; bounded so that a stream of
#: arbitrary client-supplied model names cannot grow memory without limit.
LOOKUP_CACHE_SIZE = 1024

_GLOB_CHARS = frozenset("*?[")

#: A price in USD: a YAML number (strict: ``yes`` or ``"0.5"`` is a typo), finite, not negative.
Price = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


class PriceTableError(ValueError):
    """A price table is invalid; the message names the file and the offending key path."""


class ModelPrice(BaseModel):
    """Token prices of one served model, in USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: Price
    output_per_1m: Price
    #: Prompt tokens served from the prefix cache; None means no discount (input price).
    cached_input_per_1m: Price | None = None

    @property
    def cached_rate(self) -> float:
        """The effective price of cached prompt tokens."""
        if self.cached_input_per_1m is None:
            return self.input_per_1m
        return self.cached_input_per_1m


class InstancePrice(BaseModel):
    """Price of one accelerator of an instance type, in USD per hour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_accelerator_hour: Price


class PriceTable(BaseModel):
    """Model and instance prices; build with :meth:`load` or :meth:`from_mapping`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str
    #: Served model name (``gen_ai.request.model``) or fnmatch glob -> token prices.
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    #: Instance type -> accelerator price.
    instances: dict[str, InstancePrice] = Field(default_factory=dict)
    #: Instance type used when a request's instance type is unknown.
    default_instance: str | None = None

    _globs: list[tuple[str, ModelPrice]] = PrivateAttr()
    # A plain dict (not functools.lru_cache) keeps the table picklable and copyable.
    _cache: dict[str, ModelPrice | None] = PrivateAttr(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _usd_only(cls, value: str) -> str:
        # Costs are summed across models and instances: mixing currencies would be wrong.
        if value != "USD":
            raise PydanticCustomError("currency", f"only USD is supported, got {value!r}")
        return value

    @field_validator("default_instance")
    @classmethod
    def _known_instance(cls, value: str | None, info: ValidationInfo) -> str | None:
        instances = info.data.get("instances")
        # instances is absent from info.data when it failed validation itself.
        if value is not None and instances is not None and value not in instances:
            known = ", ".join(sorted(instances)) or "none defined"
            raise PydanticCustomError(
                "unknown_instance", f"{value!r} is not an entry of instances ({known})"
            )
        return value

    def model_post_init(self, __context: Any) -> None:
        # Longest pattern first: the most specific glob wins; ties keep file order.
        globs = [(k, v) for k, v in self.models.items() if _GLOB_CHARS & set(k)]
        self._globs = sorted(globs, key=lambda kv: -len(kv[0]))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "<mapping>") -> PriceTable:
        """Validate parsed YAML/JSON; ``source`` names the origin in error messages."""
        if data is None:
            raise PriceTableError(f"{source}: empty price table")
        if not isinstance(data, Mapping):
            raise PriceTableError(
                f"{source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_key_path(e['loc'])}: {_message(e)}" for e in exc.errors()
            )
            raise PriceTableError(f"{source}: {problems}") from None

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """Read and validate a YAML price table."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PriceTableError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PriceTableError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    def price_for(self, model: str) -> ModelPrice | None:
        """Prices of a served model: exact name, else the longest matching glob, else None."""
        if not isinstance(model, str):  # a span without gen_ai.request.model: unpriced
            return None
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self._find(model)
        if len(self._cache) >= LOOKUP_CACHE_SIZE:
            self._cache.clear()  # crude but bounded; the working set refills in a few requests
        self._cache[model] = price
        return price

    def _find(self, model: str) -> ModelPrice | None:
        exact = self.models.get(model)
        if exact is not None:
            return exact
        for pattern, price in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    def token_cost(
        self,
        model: str,
        prompt_tokens: int | None,
        cached_tokens: int | None,
        output_tokens: int | None,
    ) -> float | None:
        """USD for one request's tokens, or None when the model has no price.

        Cached prompt tokens are charged at the cached rate and the rest of the
        prompt at the input rate. Counts are clamped (None and negatives count as
        0, cached at most the prompt) so inconsistent telemetry never raises.
        """
        price = self.price_for(model)
        if price is None:
            return None
        prompt = _count(prompt_tokens)
        cached = min(_count(cached_tokens), prompt)
        return (
            (prompt - cached) * price.input_per_1m
            + cached * price.cached_rate
            + _count(output_tokens) * price.output_per_1m
        ) / 1_000_000

    def accelerator_cost(
        self, accelerator_seconds: float, instance_type: str | None = None
    ) -> float | None:
        """USD for accelerator time; None for an unknown (or no default) instance type."""
        name = instance_type if instance_type is not None else self.default_instance
        instance = self.instances.get(name) if name is not None else None
        if instance is None:
            return None
        seconds = accelerator_seconds if math.isfinite(accelerator_seconds) else 0.0
        return max(seconds, 0.0) * instance.per_accelerator_hour / 3600


def price_request(record: Any, table: PriceTable) -> None:
    """Set a request record's token-basis ``usd``, or mark it ``unpriced``.

    The one place a request is priced: the SDK (at the source) and the
    collector (from spans) both call it, so their USD series agree.
    """
    usd = table.token_cost(record.model, record.prompt_tokens, record.cached_tokens,
                           record.output_tokens)
    record.usd, record.unpriced = usd, (1 if usd is None else None)


def price_usage(record: Any, table: PriceTable) -> None:
    """Set a usage record's batch-share ``usd`` (by its instance type), or mark it unpriced."""
    usd = table.accelerator_cost(record.accelerator_s, record.instance_type)
    record.usd, record.unpriced = usd, (1 if usd is None else None)


def _count(tokens: int | None) -> int:
    return max(tokens or 0, 0)


def _key_path(loc: tuple[int | str, ...]) -> str:
    """Dotted key path; a key containing a dot or blank is quoted to stay unambiguous."""
    parts = [
        f'"{p}"' if isinstance(p, str) and (not p or "." in p or " " in p) else str(p)
        for p in loc
    ]
    return ".".join(parts) or "(top level)"


def _message(error: Any) -> str:
    """Short, operator-facing wording for the common pydantic error types."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge'):g}"
    if kind == "float_type":
        return f"must be a number, got {error['input']!r}"
    if kind in ("dict_type", "model_type"):
        return "must be a mapping"
    if kind == "finite_number":
        return "must be a finite number"
    return str(error["msg"])
