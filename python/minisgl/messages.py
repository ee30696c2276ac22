"""Messages between processes: typed dataclasses with an explicit msgpack encoding.

Each message is encoded as `[tag, field1, field2, ...]`; the tag picks the class from a fixed
table, so nothing read from a socket can name an arbitrary class.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack


@dataclass
class TokenizeReq:
    """API server -> tokenizer: a prompt (text or token ids) for one choice."""

    TAG: ClassVar[int] = 1
    uid: int
    text: str | None
    input_ids: list[int] | None
    params: dict[str, Any]
    chat: bool = False


@dataclass
class UserReq:
    """Tokenizer -> scheduler: a tokenized request."""

    TAG: ClassVar[int] = 2
    uid: int
    input_ids: list[int]
    params: dict[str, Any]


@dataclass
class AbortReq:
    """Anyone -> scheduler: drop a request (client gone, stop string hit)."""

    TAG: ClassVar[int] = 3
    uid: int


@dataclass
class TokenOut:
    """Scheduler -> detokenizer: new tokens of several requests from one step."""

    TAG: ClassVar[int] = 4
    uids: list[int]
    tokens: list[int]
    finished: list[str | None]  # None, "stop", "length" or "abort"
    logprobs: list[Any] = field(default_factory=list)  # per row: None or [lp, [[id, lp], ...]]
    cached: list[int] = field(default_factory=list)  # per row: prompt tokens hit in the cache
    prompt_lens: list[int] = field(default_factory=list)


@dataclass
class TextOut:
    """Detokenizer -> API server: a text delta for one request."""

    TAG: ClassVar[int] = 5
    uid: int
    text: str
    token_ids: list[int]
    finished: str | None
    logprobs: list[Any]
    cached: int
    prompt_len: int


@dataclass
class ErrorOut:
    """Any worker -> API server: a request failed with a user-facing message."""

    TAG: ClassVar[int] = 6
    uid: int
    message: str
    status: int = 400


@dataclass
class Ready:
    """Worker -> launcher: worker `name` is up."""

    TAG: ClassVar[int] = 7
    name: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    """Scheduler -> API server: counters for /metrics."""

    TAG: ClassVar[int] = 9
    values: dict[str, float]


@dataclass
class Shutdown:
    TAG: ClassVar[int] = 10


@dataclass
class FlushCache:
    """API server -> scheduler: empty the prefix cache (only when no request is live); the
    scheduler answers with the same message, `ok` and the tokens it freed filled in."""

    TAG: ClassVar[int] = 11
    ok: bool = False
    freed_tokens: int = 0


Message = (
    TokenizeReq
    | UserReq
    | AbortReq
    | TokenOut
    | TextOut
    | ErrorOut
    | Ready
    | Stats
    | Shutdown
    | FlushCache
)
_BY_TAG: dict[int, type] = {c.TAG: c for c in typing.get_args(Message)}


def encode(msg: Message) -> bytes:
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    return msgpack.packb([msg.TAG, *values], use_bin_type=True)


def decode(data: bytes) -> Message:
    tag, *values = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise ValueError(f"unknown message tag {tag!r}")
    return cls(*values)
