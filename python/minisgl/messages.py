"""Messages between processes: typed dataclasses with an explicit msgpack encoding.

Each message is encoded as `[tag, field1, field2, ...]`; the tag picks the class from a fixed
table, so nothing read from a socket can name an arbitrary class. Three records travel inside
messages as plain lists of their fields, in declaration order: `SamplingParams` (core.py; rebuilt,
so validated, on decode), `Logprob` and `TextOut`. `decode` checks every frame against its class's field
annotations (records field by field, and TokenOut's row lengths) and raises `BadFrame` for
anything else, so a receive loop (ipc.Inbox) only ever sees well-typed messages. `check_prompt`
is the one check of a prompt against the model's `Limits`, wherever one is made (tokenizer
workers, the scheduler). Sockets, receive loops and the Ready handshake are in ipc.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Union, get_args, get_origin, get_type_hints

import msgpack

from .core import SamplingParams

HEARTBEAT_S = 0.5  # workers report this often; the API calls a worker stalled after STALL_S
STALL_S = 5.0


class Logprob(NamedTuple):
    """One output token's logprob and its top alternatives (raw model logits): the scheduler
    fills the ids and logprobs, the detokenizer the texts."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    text: str = ""
    top_texts: list[str] = []  # never mutated: the detokenizer _replace()s it

    def pairs(self) -> list[Any]:
        """`LLM.generate`'s layout: [logprob, [[id, logprob] x k]]."""
        return [self.logprob, [list(p) for p in zip(self.top_ids, self.top_logprobs)]]


@dataclass(frozen=True)
class Limits:
    """What every prompt is checked against (check_prompt)."""

    max_seq_len: int
    vocab_size: int


class PromptError(ValueError):
    """A request that can never run: its user-facing reason (HTTP 400)."""


def check_prompt(ids: list[int], params: SamplingParams, limits: Limits, fill: bool = False) -> SamplingParams:  # fmt: skip
    """`params` as the request runs: with `fill` (no max_tokens was asked), max_tokens becomes
    what the context leaves after the prompt. PromptError for a prompt that cannot run."""
    ctx, vocab, n = limits.max_seq_len, limits.vocab_size, len(ids)
    if not ids:
        raise PromptError("the prompt is empty")
    for what, some in (("", ids), ("stop_token_ids: ", params.stop_token_ids),
                       ("logit_bias: ", list(params.logit_bias or ()))):  # fmt: skip
        if some and (min(some) < 0 or max(some) >= vocab):  # C-speed scans, then the culprit
            bad = next(i for i in some if not 0 <= i < vocab)
            raise PromptError(f"{what}token id {bad} is outside the vocabulary [0, {vocab})")
    if n >= ctx:
        raise PromptError(
            f"This model's maximum context length is {ctx} tokens; the prompt has {n} tokens "
            "and leaves no room for the completion."
        )
    if fill:
        return dataclasses.replace(params, max_tokens=ctx - n)  # validated again: min_tokens
    if n + params.max_tokens > ctx:
        raise PromptError(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens."
        )
    return params


@dataclass
class TokenizeReq:
    """API server -> tokenizer: a prompt (text or token ids) for one choice; `fill`: no
    max_tokens was asked (params.max_tokens is a placeholder), generate up to the context."""

    TAG: ClassVar[int] = 1
    uid: int
    text: str | None
    input_ids: list[int] | None
    params: SamplingParams
    chat: bool = False
    fill: bool = False


@dataclass
class UserReq:
    """Tokenizer -> scheduler: a tokenized request."""

    TAG: ClassVar[int] = 2
    uid: int
    input_ids: list[int]
    params: SamplingParams


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
    logprobs: list[Logprob | None] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # per row: prompt tokens hit in the cache
    prompt_lens: list[int] = field(default_factory=list)


@dataclass
class TextOut:
    """A text delta for one request: a record inside TextOuts."""

    uid: int
    text: str
    token_ids: list[int]
    finished: str | None
    logprobs: list[Logprob | None]  # per token: None without logprobs
    cached: int
    prompt_len: int


@dataclass
class TextOuts:
    """Detokenizer -> API server: the text deltas of one scheduler step, all requests in one
    message. One message per request cost the API process a receive, an event-loop wake-up
    and a decode per token of every running request (25K messages/s at 100 requests)."""

    TAG: ClassVar[int] = 5
    outs: list[TextOut]


@dataclass
class ErrorOut:
    """Any worker -> API server: a request failed with a user-facing message."""

    TAG: ClassVar[int] = 6
    uid: int
    message: str
    status: int = 400


@dataclass
class Ready:
    """Worker -> launcher: worker `name` is up (ipc.Handshake)."""

    TAG: ClassVar[int] = 7
    name: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    """Scheduler -> API server: counters for /metrics."""

    TAG: ClassVar[int] = 8
    values: dict[str, float]


@dataclass
class Shutdown:
    TAG: ClassVar[int] = 9


@dataclass
class FlushCache:
    """API server -> scheduler: empty the prefix cache (only when no request is live); the
    scheduler answers with the same message, `ok` and the tokens it freed filled in."""

    TAG: ClassVar[int] = 10
    ok: bool = False
    freed_tokens: int = 0


@dataclass
class Heartbeat:
    """Tokenizer / detokenizer -> API server every HEARTBEAT_S (the scheduler's Stats count as
    its heartbeat), so /health notices a worker that is alive but stuck."""

    TAG: ClassVar[int] = 11
    name: str


Message = (
    TokenizeReq | UserReq | AbortReq | TokenOut | TextOuts | ErrorOut | Ready | Stats | Shutdown
    | FlushCache | Heartbeat
)  # fmt: skip


class BadFrame(ValueError):
    """A frame that is not a well-formed message of a kind its receiver accepts."""


_BAD = object()  # what a field codec returns for a value of the wrong type
_RECORDS = (SamplingParams, Logprob, TextOut)  # travel as the list of their fields


def _plain(tp: Any) -> set[type] | None:
    """The exact types a value of annotation `tp` may have, when no container is involved."""
    if get_origin(tp) in (Union, types.UnionType):
        parts = [_plain(a) for a in get_args(tp)]
        return None if None in parts else set().union(*parts)
    if tp is Any or tp in _RECORDS or get_origin(tp) is not None:
        return None
    return {int, float} if tp is float else {tp}


def _codec(tp: Any) -> Callable[[Any], Any]:
    """Values of annotation `tp` as msgpack returns them -> the field's value (records rebuilt),
    or _BAD (bool is not int)."""
    plain, origin, args = _plain(tp), get_origin(tp), get_args(tp)
    if plain is not None:
        return lambda v: v if type(v) in plain else _BAD
    if tp is Any:
        return lambda v: v
    if tp in _RECORDS:
        return _record(tp)
    if origin in (Union, types.UnionType):
        subs = [_codec(a) for a in args]
        return lambda v: next((r for r in (c(v) for c in subs) if r is not _BAD), _BAD)
    if origin is list:
        items = _plain(args[0])  # long id lists: one C-speed pass over the element types
        if items is not None:
            return lambda v: v if type(v) is list and set(map(type, v)) <= items else _BAD
        item = _codec(args[0])

        def items_of(v: Any) -> Any:
            out = list(map(item, v)) if type(v) is list else _BAD
            return _BAD if out is _BAD or any(x is _BAD for x in out) else out

        return items_of
    key, val = _codec(args[0]), _codec(args[1])  # dict of plain keys and values

    def dict_of(v: Any) -> Any:
        ok = type(v) is dict and all(
            key(k) is not _BAD and val(x) is not _BAD for k, x in v.items()
        )
        return v if ok else _BAD

    return dict_of


def _fields(cls: type) -> tuple[list[str], int, list[Callable[[Any], Any]]]:
    """A message's or record's field names (its constructor's arguments: dataclass or
    NamedTuple), how many are required, and their codecs."""
    hints, params = get_type_hints(cls), inspect.signature(cls).parameters
    required = sum(p.default is inspect.Parameter.empty for p in params.values())
    return list(params), required, [_codec(hints[n]) for n in params]


def _record(cls: type) -> Callable[[Any], Any]:
    _, required, codecs = _fields(cls)

    def build(v: Any) -> Any:
        if type(v) is not list or not required <= len(v) <= len(codecs):
            return _BAD
        values = [c(x) for c, x in zip(codecs, v)]
        if any(x is _BAD for x in values):
            return _BAD
        try:
            return cls(*values)  # SamplingParams validates itself
        except (TypeError, ValueError):
            return _BAD

    return build


_BY_TAG = {cls.TAG: (cls, *_fields(cls)) for cls in get_args(Message)}
_RECORD_FIELDS = {cls: _fields(cls)[0] for cls in (SamplingParams, TextOut)}


def _pack(obj: Any) -> Any:
    names = _RECORD_FIELDS.get(type(obj))
    if names is not None:
        return [getattr(obj, n) for n in names]
    raise TypeError(f"cannot encode {type(obj).__name__}")  # a Logprob packs as its tuple


def encode(msg: Message) -> bytes:
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    return msgpack.packb([msg.TAG, *values], use_bin_type=True, default=_pack)


def decode(data: bytes, accept: tuple[type, ...] = ()) -> Message:
    """The message in `data`; BadFrame unless it is well formed (and one of `accept`, if given)."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise BadFrame(f"not msgpack: {e!r}") from None
    if type(frame) is not list or not frame or type(frame[0]) is not int:
        raise BadFrame(f"not a [tag, ...] list: {str(frame)[:80]}")
    tag, *values = frame
    cls, names, required, codecs = _BY_TAG.get(tag, (None, [], 0, []))
    if cls is None or (accept and cls not in accept):
        raise BadFrame(f"unexpected message tag {tag}")
    if not required <= len(values) <= len(codecs):
        raise BadFrame(f"{cls.__name__} with {len(values)} fields")
    for i, (name, codec, v) in enumerate(zip(names, codecs, values)):
        values[i] = codec(v)
        if values[i] is _BAD:
            raise BadFrame(f"{cls.__name__}.{name} of the wrong type: {str(v)[:80]}")
    msg = cls(*values)
    if isinstance(msg, TokenOut):  # one entry per row (the optional lists may be empty)
        n, rows = len(msg.uids), (msg.logprobs, msg.cached, msg.prompt_lens)
        if {len(msg.tokens), len(msg.finished), *(len(r) or n for r in rows)} != {n}:
            raise BadFrame("TokenOut rows of different lengths")
    return msg
