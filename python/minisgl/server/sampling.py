"""The sampling fields of the request schemas (protocol.py): their checks, and their mapping to
the engine's SamplingParams, one per choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from minisgl.core import SamplingParams

from .generation import ApiError

MAX_INT = 2**31 - 1  # token counts, top_k: anything larger is nonsense and kept off msgpack
MAX_STOP = 16  # stop strings per request
MAX_STOP_LEN = 1024
MAX_TOP_LOGPROBS = 20


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


_POSITIVE = (lambda v: 1 <= v <= MAX_INT, f"must be an integer in [1, {MAX_INT}], got {{v}}")
_SEED = (lambda v: -(2**63) <= v < 2**63, "must fit in a signed 64-bit integer")
_TOP = (lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]")
# field -> (test, message refusing a value that fails it ({v}: the value)); None always passes
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: 0 <= v <= 100, "must be in [0, 100], got {v}"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1], got {v}"),
    "top_k": (lambda v: v in (-1, 0) or 1 <= v <= MAX_INT,
              "must be -1 or 0 (disabled) or a positive integer, got {v}"),
    "n": (lambda v: v >= 1, "must be >= 1, got {v}"),
    "stop_token_ids": (lambda v: len(v) <= 1024 and all(0 <= i <= MAX_INT for i in v),
                       "must be at most 1024 non-negative token ids"),
    "seed": _SEED, "sampling_seed": _SEED,
    "max_tokens": _POSITIVE, "max_completion_tokens": _POSITIVE, "max_new_tokens": _POSITIVE,
    "logprobs": _TOP, "top_logprobs": _TOP,  # a chat's logprobs is a bool: always in range
}  # fmt: skip


def check_ids(ids: list[int], what: str, vocab: int) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{what}: token id {bad} is outside the vocabulary [0, {vocab})", what)


def engine_params(s: Any, vocab: int, max_n: int, seed: int | None, **kw: Any) -> list:
    """The engine's params of each of the `s.n` choices: choice i uses seed + i (different but
    reproducible). An unset max_tokens is MAX_INT here; the tokenizer worker fits it to the
    context (TokenizeReq.fill)."""
    if s.n > max_n:
        raise ApiError(400, f"n must be at most {max_n}, got {s.n}", "n")
    check_ids(s.stop_token_ids or [], "stop_token_ids", vocab)
    check_ids(list(kw.get("logit_bias") or {}), "logit_bias", vocab)
    kw["max_tokens"] = kw["max_tokens"] or MAX_INT
    kw["logprobs"] = -1 if kw["logprobs"] is None else kw["logprobs"]
    top_k = s.top_k if s.top_k not in (None, 0) and s.top_k < vocab else -1
    temperature = 1.0 if s.temperature is None else float(s.temperature)
    top_p = 1.0 if s.top_p is None else float(s.top_p)
    stop_ids = list(s.stop_token_ids or [])
    try:
        return [SamplingParams(temperature, top_k, top_p, ignore_eos=s.ignore_eos,
                               stop_token_ids=stop_ids, **kw,
                               seed=None if seed is None else (seed + i) % 2**63)
                for i in range(s.n)]  # fmt: skip
    except ValueError as e:  # min_tokens > max_tokens
        raise ApiError(400, str(e)) from None


class SamplingChecks(StrictModel):
    """The checks of the sampling fields of every request schema: RANGES, and the stop strings
    (each schema declares the fields it has, and their defaults)."""

    @field_validator(*RANGES, check_fields=False)
    @classmethod
    def _range(cls, v: Any, info: ValidationInfo) -> Any:
        ok, msg = RANGES[info.field_name]
        if v is not None and not ok(v):
            raise ValueError(msg.format(v=v))
        return v

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop sequences must be non-empty and at most {MAX_STOP_LEN} chars")
        return stops
