"""Typed request-level data: sampling parameters, requests and batches."""

from __future__ import annotations

import math
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid SamplingParams: {msg}")

        t = self.temperature
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise bad(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise bad(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        p = self.top_p
        if not isinstance(p, int | float) or isinstance(p, bool) or not (0 < p <= 1):
            raise bad(f"top_p must be in (0, 1], got {p!r}")
        m = self.max_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {m!r}")
        if not all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.logprobs, int) or not (-1 <= self.logprobs <= 20):
            raise bad(f"logprobs must be an integer in [-1, 20], got {self.logprobs!r}")


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop token / string
    LENGTH = "length"  # max_tokens or context length
    ABORT = "abort"


@dataclass(eq=False)
class Req:
    """One request inside the scheduler.

    `token_ids` holds prompt + outputs known on the host. `device_len` counts tokens that
    exist on the device (it runs one ahead of the host under overlap scheduling) and
    `cached_len` counts tokens whose KV is already in the cache.
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
    finished: bool = False
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.token_ids)
        self.device_len = self.device_len or len(self.token_ids)

    @property
    def max_device_len(self) -> int:
        return self.prompt_len + self.params.max_tokens

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclass
class Batch:
    """A forward batch: every request extends from `cached_len` to `cached_len + extend_len`."""

    reqs: list[Req]
    is_prefill: bool
    extend_lens: list[int]  # tokens to compute per request in this step
    prefix_lens: list[int]  # tokens already in the KV cache per request
    sample_mask: list[bool]  # whether the request samples a token this step (False mid-chunk)
    out_loc: Any  # KV slot of every new token (list or int64 numpy array)
    input_ids: list[int] | None = None  # new tokens' ids (prefill); decode reads them on the device
    sample_positions: list[int] = field(default_factory=list)  # position of each sampled token

    @property
    def size(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)
