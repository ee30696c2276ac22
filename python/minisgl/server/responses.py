"""Response bodies: OpenAI completions and chat completions (whole, streamed), native /generate."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse

from minisgl.messages import Logprob

from .generation import ApiError, Choice, Generation
from .protocol import StreamOptions
from .tools import ChatParser

# error types by status; others: invalid_request_error below 500, server_error from it
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error",
               500: "internal_server_error", 503: "service_unavailable"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    headers = {"Retry-After": "1", **(headers or {})} if status == 429 else headers
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- logprobs -------------------------------------------------------------------------------
def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode(errors="replace"))}


def chat_logprobs(entries: list[Logprob]) -> dict[str, Any]:
    content = []
    for e in entries:
        alts = [_token(t, v) for t, v in zip(e.top_texts, e.top_logprobs)]
        content.append({**_token(e.text, e.logprob), "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(entries: list[Logprob], offset: int) -> dict[str, Any]:
    tops, offsets = [], []
    for e in entries:
        alts = dict(zip(e.top_texts, e.top_logprobs))
        alts.setdefault(e.text, e.logprob)  # OpenAI always lists the sampled token (k + 1 at most)
        tops.append(alts)
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}  # fmt: skip


class Formatter:
    """Builds the OpenAI bodies of one request (`kind` is "completion" or "chat"). A chat's
    `parser` makes each choice's ChatParser (reasoning, tool calls: tools.py)."""

    def __init__(self, kind: str, model: str, fingerprint: str, want_logprobs: bool,
                 stream_options: StreamOptions | None,
                 parser: Callable[[], ChatParser] | None = None) -> None:  # fmt: skip
        self.kind, self.model, self.want_logprobs = kind, model, want_logprobs
        so = stream_options or StreamOptions()
        self.include_usage, self.continuous_usage = so.include_usage, so.continuous_usage_stats
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.fingerprint = fingerprint
        self.parser = parser or (lambda: ChatParser(False, None))
        self._parsers: dict[int, ChatParser] = {}
        self._offsets: dict[int, int] = {}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}  # fmt: skip

    def _parse(self, c: Choice, text: str, final: bool) -> dict[str, Any]:
        if c.index not in self._parsers:
            self._parsers[c.index] = self.parser()
        return self._parsers[c.index].feed(text, final)

    def _finish(self, c: Choice) -> str | None:
        """ "tool_calls" when a choice that stopped by itself called tools (as OpenAI)."""
        p = self._parsers.get(c.index)
        called = p is not None and p.calls and not isinstance(p.mode, dict)
        return "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason

    def _logprobs(self, c: Choice, entries: list[Logprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries)
        off = self._offsets.get(c.index, 0)
        self._offsets[c.index] = off + sum(len(e.text) for e in entries)
        return completion_logprobs(entries, off)

    def full(self, gen: Generation) -> dict[str, Any]:
        choices = []
        for c in gen.choices:
            choice: dict[str, Any] = {"index": c.index}
            if self.kind == "chat":
                parts = self._parse(c, c.text, True)
                calls = self._parsers[c.index].calls
                msg = {"role": "assistant", "content": parts.get("content", None if calls else "")}
                msg.update({k: v for k, v in parts.items() if k == "reasoning_content"})
                choice["message"] = msg | ({"tool_calls": calls} if calls else {})
            else:
                choice["text"] = c.text
            choice["logprobs"] = self._logprobs(c, c.logprobs)
            choice["finish_reason"] = self._finish(c)  # a completion has no parser: its own
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": gen.usage()}

    async def stream(self, gen: Generation) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        try:
            async for ev in gen.events():
                c = ev.choice
                first = self.kind == "chat" and c.index not in self._parsers  # parsed from now
                if not (ev.delta or ev.finished or ev.logprobs or first):
                    continue
                choice: dict[str, Any] = {"index": c.index}
                if self.kind == "chat":
                    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                    delta.update(self._parse(c, ev.delta, ev.finished))
                    if not (delta or ev.finished or ev.logprobs):
                        continue  # held back by a parser
                    choice["delta"] = delta
                else:
                    choice["text"] = ev.delta
                choice["logprobs"] = self._logprobs(c, ev.logprobs)
                choice["finish_reason"] = self._finish(c) if ev.finished else None
                chunk = {**self._head(obj), "choices": [choice]}
                if self.include_usage or self.continuous_usage:
                    chunk["usage"] = gen.usage() if self.continuous_usage else None
                yield sse(chunk)
            if self.include_usage:
                yield sse({**self._head(obj), "choices": [], "usage": gen.usage()})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield sse(error_body(e.status, e.message, e.param))


# ---- native /generate -----------------------------------------------------------------------
class NativeFormatter:
    """Builds the /generate bodies of one request (SGLang's shapes); `texts`: token texts in the
    logprobs (else None per entry)."""

    def __init__(self, want_logprobs: bool, texts: bool = True) -> None:
        self.id = "gen-" + uuid.uuid4().hex
        self.want_logprobs, self.texts = want_logprobs, texts

    def item(self, c: Choice) -> dict[str, Any]:
        finish = None if c.finish_reason is None else {"type": c.finish_reason}
        meta: dict[str, Any] = {"id": self.id, "finish_reason": finish,
                                "prompt_tokens": c.prompt_len, "completion_tokens": len(c.token_ids),
                                "cached_tokens": c.cached}  # fmt: skip
        if self.want_logprobs:
            texts = self.texts
            meta["output_token_logprobs"] = [
                [e.logprob, tid, e.text if texts else None]
                for e, tid in zip(c.logprobs, c.token_ids)
            ]
            tops = [zip(e.top_ids, e.top_texts, e.top_logprobs) for e in c.logprobs]
            meta["output_top_logprobs"] = [
                [[v, i, t if texts else None] for i, t, v in e] for e in tops
            ]
        text, ids = c.text[: c.sent], list(c.token_ids)
        return {"index": c.index, "text": text, "output_ids": ids, "meta_info": meta}

    def full(self, gen: Generation) -> dict[str, Any] | list[dict[str, Any]]:
        items = [self.item(c) for c in gen.choices]
        return items[0] if len(items) == 1 else items

    async def stream(self, gen: Generation) -> AsyncIterator[str]:
        """Each event carries the text and ids so far (SGLang's /generate streaming format)."""
        try:
            async for ev in gen.events():
                if ev.delta or ev.finished:
                    yield sse(self.item(ev.choice))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield sse(error_body(e.status, e.message, e.param))
