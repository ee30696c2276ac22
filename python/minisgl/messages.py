"""Messages between processes: typed dataclasses with an explicit msgpack encoding.

Each message is encoded as `[tag, field1, field2, ...]`; the tag picks the class from a fixed
table, so nothing read from a socket can name an arbitrary class. `decode` checks every frame
against its class's field annotations (and TokenOut's row lengths) and raises `BadFrame` for
anything else, so a receive loop only ever sees well-typed messages. `Inbox` is the one
receive-side helper every loop uses: it drops bad frames (and frames whose handler failed) with
a warning at most once a second, and its `serve` loop also sends the worker's heartbeats.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import msgpack

HEARTBEAT_S = 0.5  # workers report this often; the API calls a worker stalled after STALL_S
STALL_S = 5.0


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


@dataclass
class Heartbeat:
    """Tokenizer / detokenizer -> API server every HEARTBEAT_S (the scheduler's Stats count as
    its heartbeat), so /health notices a worker that is alive but stuck."""

    TAG: ClassVar[int] = 12
    name: str


Message = (
    TokenizeReq | UserReq | AbortReq | TokenOut | TextOut | ErrorOut | Ready | Stats | Shutdown
    | FlushCache | Heartbeat
)  # fmt: skip


class BadFrame(ValueError):
    """A frame that is not a well-formed message of a kind its receiver accepts."""


def _plain(tp: Any) -> set[type] | None:
    """The exact types a value of annotation `tp` may have, when no container is involved."""
    if get_origin(tp) in (Union, types.UnionType):
        parts = [_plain(a) for a in get_args(tp)]
        return None if None in parts else set().union(*parts)
    if tp is Any or get_origin(tp) is not None:
        return None
    return {int, float} if tp is float else {tp}


def _checker(tp: Any) -> Callable[[Any], bool]:
    """A predicate for values of annotation `tp` as msgpack returns them (bool is not int)."""
    plain, origin, args = _plain(tp), get_origin(tp), get_args(tp)
    if plain is not None:
        return lambda v: type(v) in plain
    if tp is Any:
        return lambda v: True
    if origin in (Union, types.UnionType):
        subs = [_checker(a) for a in args]
        return lambda v: any(c(v) for c in subs)
    if origin is list:
        items = _plain(args[0])  # long id lists: one C-speed pass over the element types
        if items is not None:
            return lambda v: type(v) is list and set(map(type, v)) <= items
        item = _checker(args[0])
        return lambda v: type(v) is list and all(map(item, v))
    key, val = _checker(args[0]), _checker(args[1])  # dict
    return lambda v: type(v) is dict and all(key(k) and val(x) for k, x in v.items())


_BY_TAG: dict[int, tuple[type, int, list[Callable[[Any], bool]]]] = {}
for _cls in get_args(Message):
    _hints, _fields = get_type_hints(_cls), dataclasses.fields(_cls)
    _required = sum(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    for f in _fields)  # fmt: skip
    _BY_TAG[_cls.TAG] = (_cls, _required, [_checker(_hints[f.name]) for f in _fields])


def encode(msg: Message) -> bytes:
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    return msgpack.packb([msg.TAG, *values], use_bin_type=True)


def decode(data: bytes, accept: tuple[type, ...] = ()) -> Message:
    """The message in `data`; BadFrame unless it is well formed (and one of `accept`, if given)."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise BadFrame(f"not msgpack: {e!r}") from None
    if type(frame) is not list or not frame or type(frame[0]) is not int:
        raise BadFrame(f"not a [tag, ...] list: {str(frame)[:80]}")
    tag, *values = frame
    cls, required, checks = _BY_TAG.get(tag, (None, 0, []))
    if cls is None or (accept and cls not in accept):
        raise BadFrame(f"unexpected message tag {tag}")
    if not required <= len(values) <= len(checks):
        raise BadFrame(f"{cls.__name__} with {len(values)} fields")
    for f, check, v in zip(dataclasses.fields(cls), checks, values):
        if not check(v):
            raise BadFrame(f"{cls.__name__}.{f.name} of the wrong type: {str(v)[:80]}")
    msg = cls(*values)
    if isinstance(msg, TokenOut):  # one entry per row (the optional lists may be empty)
        n, rows = len(msg.uids), (msg.logprobs, msg.cached, msg.prompt_lens)
        if {len(msg.tokens), len(msg.finished), *(len(r) or n for r in rows)} != {n}:
            raise BadFrame("TokenOut rows of different lengths")
    return msg


class Inbox:
    """Decoding for one receive loop: bad frames are dropped and logged (rate-limited)."""

    def __init__(self, where: str, *accept: type) -> None:
        self.where, self.accept = where, accept
        self.log = logging.getLogger(f"minisgl.{where}")
        self.dropped, self.next_log = 0, 0.0

    def drop(self, why: object) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now >= self.next_log:  # a flood of bad frames must not become a flood of log lines
            self.log.warning("%s: dropped %d bad frame(s); last: %s", self.where, self.dropped, why)
            self.dropped, self.next_log = 0, now + 1.0

    def decode(self, data: bytes) -> Message | None:
        try:
            return decode(data, self.accept)
        except BadFrame as e:
            self.drop(e)
            return None

    def dispatch(self, data: bytes, handle: Callable[[Any], None]) -> None:
        """Decode and handle one frame; a handler error drops that frame, not the loop."""
        msg = self.decode(data)
        if msg is not None:
            try:
                handle(msg)
            except Exception as e:
                self.drop(f"{type(msg).__name__} failed: {e!r}")

    def serve(self, sock: Any, handle: Callable[[Any], None], beat_to: Any) -> None:
        """A worker's loop over a zmq PULL socket, forever; a Heartbeat named after this inbox
        goes to the `beat_to` socket every HEARTBEAT_S."""
        beat, next_beat = encode(Heartbeat(self.where)), 0.0
        while True:
            if sock.poll(100):  # wake up now and then so a SIGTERM handler can run
                self.dispatch(sock.recv(), handle)
            if time.monotonic() >= next_beat:
                beat_to.send(beat)
                next_beat = time.monotonic() + HEARTBEAT_S
