"""Detokenizer worker: token ids from the scheduler -> exact incremental text for the API.

Incremental decoding uses the prefix-offset / read-offset technique (as in vLLM and SGLang):
for each request we decode a short window `ids[prefix:]` and emit what it adds beyond
`ids[prefix:read]`. Decoding a window that starts a few tokens back keeps SentencePiece's
leading spaces right, and text ending in U+FFFD (an incomplete multi-byte UTF-8 character
spread over byte-fallback tokens) is held back until the character completes. The
concatenation of the deltas equals `tokenizer.decode(ids, skip_special_tokens=True)`.

SentencePiece's byte-fallback decoder turns a whole run of byte tokens into text at once (and
into one U+FFFD per byte when the run is not valid UTF-8), so a later byte can change the text
of earlier ones. To stay exact we also hold text back while the last (non-special) token is a
byte token; the run is released at the next ordinary token or when the request finishes.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from minisgl.messages import (
    AbortReq,
    ErrorOut,
    FlushCache,
    Logprob,
    Stats,
    TextOut,
    TextOuts,
    TokenOut,
)

logger = logging.getLogger("minisgl.detokenizer")

_DECODE_KW = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


@dataclass
class _DecodeState:
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # start of the context window
    read: int = 0  # tokens up to here have been turned into text


class IncrementalDetokenizer:
    """Per-request incremental detokenization state, batched over one scheduler step."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[int, _DecodeState] = {}
        self._anchor: list[int] | None = None
        self._token_text: dict[int, str] = {}
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        self.byte_ids: frozenset[int] = frozenset()
        try:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            byte = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
            self.byte_ids = frozenset(i for i, p in enumerate(pieces) if p and byte.match(p))
        except Exception:  # no tokenizer, or an exotic one: FFFD hold-back alone
            pass

    def _in_byte_run(self, ids: list[int]) -> bool:
        """Whether the last token that is not a special one is a byte token."""
        return next((t in self.byte_ids for t in reversed(ids) if t not in self.special_ids), False)

    def step(self, items: list[tuple[int, list[int], bool]]) -> list[str]:
        """`items`: (uid, new token ids, finished). Returns one text delta per item."""
        if self.tokenizer is None:  # no states either
            return [""] * len(items)
        states = []
        for uid, new_ids, _ in items:
            st = self.states.setdefault(uid, _DecodeState())
            st.ids.extend(new_ids)
            states.append(st)
        decode = self.tokenizer.batch_decode
        prefix_texts = decode([st.ids[st.prefix : st.read] for st in states], **_DECODE_KW)
        full_texts = decode([st.ids[st.prefix :] for st in states], **_DECODE_KW)
        out = []
        for (uid, _, done), st, before, full in zip(items, states, prefix_texts, full_texts):
            if done:
                self.states.pop(uid, None)
            complete = not full.endswith("\ufffd") and not self._in_byte_run(st.ids)
            if done or (len(full) > len(before) and complete):
                out.append(full[len(before) :])
                st.prefix, st.read = st.read, len(st.ids)
            else:
                out.append("")
        return out

    def drop(self, uid: int) -> None:
        self.states.pop(uid, None)

    def token_text(self, token_id: int) -> str:
        """Text of one token as it reads mid-sentence (keeps SentencePiece's leading space)."""
        if self.tokenizer is None:
            return ""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.tokenizer
            if self._anchor is None:
                self._anchor = tok.encode("a", add_special_tokens=False)[-1:] or [0]
            head = tok.decode(self._anchor, skip_special_tokens=False)
            both = tok.decode(self._anchor + [token_id], skip_special_tokens=False)
            text = both[len(head) :] if both.startswith(head) else tok.decode([token_id])
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def render_logprobs(self, token_id: int, row: Logprob | None) -> Logprob | None:
        """The scheduler's record with the texts filled in."""
        if row is None:
            return None
        texts = [self.token_text(i) for i in row.top_ids]
        return row._replace(text=self.token_text(token_id), top_texts=texts)


def load_tokenizer(args: Any) -> Any | None:
    """The tokenizer of the model directory `args.model` (the launcher resolved a hub id before
    spawning the workers), with --chat-template applied; None when the directory has none
    (dummy-weight directories): then ids still flow and texts are empty."""
    from minisgl.tokenizer import load_tokenizer as load

    tok = load(args.model, args.chat_template)
    if tok is None:
        logger.warning("no tokenizer in %s: outputs carry token ids only", args.model)
    return tok


class Detokenizer:
    """Turns a TokenOut into one TextOuts (and an ErrorOut per request that cannot be
    decoded); forwards everything else unchanged."""

    def __init__(self, tokenizer: Any | None, max_aborted: int = 65536) -> None:
        self.inc = IncrementalDetokenizer(tokenizer)
        self.aborted: OrderedDict[int, None] = OrderedDict()
        self.max_aborted = max_aborted

    def handle(self, msg: Any) -> list[Any]:
        if isinstance(msg, TokenOut):
            return self.handle_tokens(msg)
        if isinstance(msg, AbortReq):  # from the API: the client is gone, free the state
            self.inc.drop(msg.uid)
            self.aborted[msg.uid] = None
            while len(self.aborted) > self.max_aborted:
                self.aborted.popitem(last=False)
            return []
        if isinstance(msg, ErrorOut):
            self.inc.drop(msg.uid)
        return [msg]

    def handle_tokens(self, msg: TokenOut) -> list[TextOuts | ErrorOut]:
        n = len(msg.uids)
        logprobs, cached = msg.logprobs or [None] * n, msg.cached or [0] * n
        prompt_lens = msg.prompt_lens or [0] * n
        outs: dict[int, TextOut] = {}  # by uid: a request normally appears once per step
        for i, uid in enumerate(msg.uids):
            if uid in self.aborted:
                if msg.finished[i] is not None:
                    self.aborted.pop(uid, None)
                continue
            out = outs.get(uid)
            if out is None:
                out = outs[uid] = TextOut(uid, "", [], None, [], 0, 0)
            token = int(msg.tokens[i])
            out.token_ids.append(token)
            out.logprobs.append(self.inc.render_logprobs(token, logprobs[i]))
            out.finished, out.cached, out.prompt_len = msg.finished[i], cached[i], prompt_lens[i]
        if not outs:
            return []
        items = [(uid, o.token_ids, o.finished is not None) for uid, o in outs.items()]
        texts: list[str | Exception] = []
        try:
            texts += self.inc.step(items)
        except Exception:  # one undecodable id must fail its own request, not the worker
            for uid, _, done in items:  # the states hold the new ids: each request on its own
                try:
                    texts += self.inc.step([(uid, [], done)])
                except Exception as e:
                    texts.append(e)
        errors: list[TextOuts | ErrorOut] = []
        for uid, text in zip(list(outs), texts):
            if isinstance(text, Exception):
                ids = outs.pop(uid).token_ids[-8:]
                logger.error("request %d: cannot detokenize %s: %s", uid, ids, text)
                self.inc.drop(uid)
                self.aborted[uid] = None  # its later tokens are dropped, not decoded again
                why = f"internal error: cannot detokenize output: {text}"
                errors.append(ErrorOut(uid, why, 500))
            else:
                outs[uid].text = text
        return ([TextOuts(list(outs.values()))] if outs else []) + errors


def run_detokenizer(args: Any) -> None:
    """Process entry: PULL at detokenizer, PUSH to api (ipc.py)."""
    import zmq

    from minisgl import ipc

    tokenizer = load_tokenizer(args)
    detok = Detokenizer(tokenizer)
    d, ctx = args.zmq_dir, zmq.Context()
    pull, push = ipc.pull(ctx, d, ipc.DETOKENIZER), ipc.push(ctx, d, ipc.API)
    _ready = ipc.announce(ctx, d, ipc.DETOKENIZER, {"has_tokenizer": tokenizer is not None})

    def handle(msg: Any) -> None:
        for out in detok.handle(msg):
            ipc.send(push, out)

    inbox = ipc.Inbox(ipc.DETOKENIZER, TokenOut, AbortReq, ErrorOut, Stats, FlushCache)
    inbox.serve(pull, handle, push)
