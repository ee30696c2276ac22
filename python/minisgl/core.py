"""Typed request-level data: sampling parameters, requests and batches."""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    # number of top alternatives to report with each token's logprob; -1 = no logprobs
    logprobs: int = -1
    # vLLM's semantics: presence/frequency over the output tokens, repetition over prompt +
    # output (divides positive logits, multiplies negative ones), min_p relative to the most
    # likely token, logit_bias added to the logits, min_tokens bans EOS/stop tokens until then
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    # structured output: [kind, spec] with kind "json" (a JSON schema) or "regex"
    grammar: list[str] | None = None

    @property
    def needs_processing(self) -> bool:
        """Whether the logits need more than temperature / top-k / top-p before sampling."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.min_p or self.logit_bias or self.min_tokens or self.grammar
        )  # fmt: skip

    def __post_init__(self) -> None:  # every construction is validated, replace() too
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid SamplingParams: {msg}")

        def num(v: Any, kinds: Any = int | float) -> bool:  # of type `kinds`, not a bool
            return isinstance(v, kinds) and not isinstance(v, bool)

        t = self.temperature
        if not num(t) or not math.isfinite(t) or t < 0:
            raise bad(f"temperature must be a finite number >= 0, got {t!r}")
        if not num(self.top_k, int):
            raise bad(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        p = self.top_p
        if not num(p) or not (0 < p <= 1):
            raise bad(f"top_p must be in (0, 1], got {p!r}")
        m = self.max_tokens
        if not num(m, int) or m < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {m!r}")
        if not all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and not num(self.seed, int):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.logprobs, int) or not (-1 <= self.logprobs <= 20):
            raise bad(f"logprobs must be an integer in [-1, 20], got {self.logprobs!r}")
        for name, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                             ("repetition_penalty", 0, 2), ("min_p", 0, 1)):  # fmt: skip
            v = getattr(self, name)
            if not num(v) or not lo <= v <= hi or (name == "repetition_penalty" and v == 0):
                raise bad(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        lb, g = self.logit_bias or {}, self.grammar
        if not isinstance(lb, dict) or not all(
            isinstance(k, int) and k >= 0 and isinstance(v, int | float) and -100 <= v <= 100
            for k, v in lb.items()
        ):
            raise bad("logit_bias must map token ids to numbers in [-100, 100]")
        if g is not None and not (isinstance(g, list) and len(g) == 2 and g[0] in ("json", "regex")
                                  and isinstance(g[1], str)):  # fmt: skip
            raise bad(f"grammar must be ['json' | 'regex', spec], got {g!r}")


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop token / string
    LENGTH = "length"  # max_tokens or context length
    ABORT = "abort"


@dataclass(eq=False)
class Req:
    """One request inside the scheduler.

    `token_ids` holds prompt + outputs known on the host. `device_len` counts tokens that
    exist on the device (it runs one ahead of the host under overlap scheduling: the
    `token_in_flight`) and `cached_len` counts tokens whose KV is already in the cache; the
    `extend_len` tokens between the two are computed by the next prefill chunk or decode step.
    """

    uid: int
    token_ids: list[int]
    params: SamplingParams
    prompt_len: int = 0
    table_idx: int = -1
    cached_len: int = 0
    device_len: int = 0
    cache_hit: int = 0  # tokens currently shared with the prefix cache (page aligned)
    prompt_cached: int = -1  # prompt tokens found in the cache at first admission (reported)
    cache_handle: Any = None
    finished: bool = False  # stopped or aborted: a token still in flight for it is dropped
    grammar: Any = None  # Future of the compiled grammar of params.grammar

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.token_ids)
        self.device_len = self.device_len or len(self.token_ids)

    @property
    def max_device_len(self) -> int:
        return self.prompt_len + self.params.max_tokens

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def extend_len(self) -> int:
        return self.device_len - self.cached_len

    @property
    def can_decode(self) -> bool:
        """Prefilled (only the newest token lacks KV) and a token left to sample."""
        return self.cached_len == self.device_len - 1 < self.max_device_len - 1

    @property
    def token_in_flight(self) -> bool:
        """Its last sampled token has not reached the host yet (overlap scheduling)."""
        return self.device_len > len(self.token_ids)


def stop_reason(req: Req, eos: Container[int], max_seq_len: int) -> FinishReason | None:
    """Why `req` stops after its newest token, or None. Pure: reads the request only. A stop
    token is kept in the output and counts even with `ignore_eos`."""
    tok, p = req.token_ids[-1], req.params
    if (tok in eos and not p.ignore_eos) or tok in p.stop_token_ids:
        return FinishReason.STOP
    if req.num_outputs >= p.max_tokens or len(req.token_ids) >= max_seq_len:
        return FinishReason.LENGTH
    return None


@dataclass
class Batch:
    """A forward batch: request i computes `extend_lens[i]` tokens after its `prefix_lens[i]`.
    The lists hold the values at scheduling: under overlap the `Req` counters move on before
    the step is processed."""

    reqs: list[Req]
    is_prefill: bool
    extend_lens: list[int]  # tokens to compute per request in this step
    prefix_lens: list[int]  # tokens already in the KV cache per request
    sample_mask: list[bool]  # whether the request samples a token this step (False mid-chunk)
    out_loc: Any  # KV slot of every new token (list or int64 numpy array)
    input_ids: list[int] | None = None  # new tokens' ids (prefill); decode reads them on the device
    sample_positions: list[int] = field(default_factory=list)  # position of each sampled token
    kv_copy: tuple[Any, Any] | None = None  # (source, destination) KV slots to copy first

    @property
    def size(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def sampled_reqs(self) -> list[Req]:
        return [r for r, s in zip(self.reqs, self.sample_mask) if s]
