"""One HTTP request's engine requests (n choices x prompts): stop strings, streaming, aborts."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from minisgl.messages import ErrorOut, TextOut

from .bridge import Bridge, ReqHandle


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Choice:
    """Output state of one engine request; `text` is already trimmed at a stop string."""

    index: int
    prompt_index: int
    stops: list[str]
    text: str = ""
    sent: int = 0  # chars of `text` already handed out
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # per token: [text, lp, [[id, text, lp]]]
    finish_reason: str | None = None
    prompt_len: int = 0
    cached: int = 0
    _search_from: int = 0
    _lp_start: list[int] = field(default_factory=list)  # per logprob entry: len(text) before it
    _lp_sent: int = 0

    def feed(self, msg: TextOut) -> tuple[str, list[Any]]:
        """Take one TextOut; return (text delta safe to emit now, logprob entries of the text
        emitted so far: those of a stop string and of an EOS that adds no text never are)."""
        self.token_ids += msg.token_ids
        new_lps = [lp for lp in msg.logprobs if lp is not None]
        self.logprobs += new_lps
        self._lp_start += [len(self.text)] * len(new_lps)
        self.prompt_len, self.cached = msg.prompt_len, msg.cached
        self.text += msg.text
        done = msg.finished is not None
        if self.stops:
            hit = -1
            for s in self.stops:
                i = self.text.find(s, self._search_from)
                if i >= 0 and (hit < 0 or i < hit):
                    hit = i
            if hit >= 0:
                self.text = self.text[:hit]
                self.finish_reason, done = "stop", True
                del self.logprobs[bisect_left(self._lp_start, hit) :]
            else:
                longest = max(len(s) for s in self.stops)
                self._search_from = max(0, len(self.text) - longest + 1)
        if msg.finished is not None and self.finish_reason is None:
            self.finish_reason = msg.finished
            last = self.logprobs[-1][0] if msg.finished == "stop" and self.logprobs else None
            if last is not None and not (last and self.text.endswith(last)):
                self.logprobs.pop()  # the stop token's text is not in the output
        end = len(self.text) if done else len(self.text) - self._holdback()
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        n = len(self.logprobs) if done else bisect_left(self._lp_start, self.sent)
        lps, self._lp_sent = self.logprobs[self._lp_sent : n], max(n, self._lp_sent)
        return delta, lps

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    choice: Choice
    delta: str
    logprobs: list[Any]
    finished: bool


class Generation:
    """Submits every choice, waits until each has answered once (so an input error becomes
    an HTTP error, not a broken stream), then yields events until all choices finish."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list[ReqHandle] = []
        self.choices: list[Choice] = []
        self._buffer: list[tuple[int, Any]] = []

    def add(
        self, prompt_index: int, prompt: str | list[int], params: dict, stops: list[str], chat: bool
    ) -> None:
        index = len(self.choices)
        self.choices.append(Choice(index, prompt_index, list(stops or [])))
        self.handles.append(self.bridge.submit(self.queue, index, prompt, params, chat))

    async def start(self) -> None:
        seen: set[int] = set()
        try:
            while len(seen) < len(self.choices):
                index, msg = await self.queue.get()
                if isinstance(msg, ErrorOut):
                    raise ApiError(msg.status, msg.message)
                seen.add(index)
                self._buffer.append((index, msg))
        except BaseException:
            self.abort()
            raise

    def _process(self, index: int, msg: Any) -> Event | None:
        c = self.choices[index]
        if c.done:
            return None  # late output after a stop string
        if isinstance(msg, ErrorOut):
            raise ApiError(msg.status, msg.message)
        delta, lps = c.feed(msg)
        if c.done:  # no-op unless a stop string hit: then it counts as a "stop" finish
            self.bridge.abort(self.handles[index], "stop")
        return Event(c, delta, lps, c.done)

    async def _next(self) -> tuple[int, Any]:
        return self._buffer.pop(0) if self._buffer else await self.queue.get()

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)

    async def events(self) -> AsyncIterator[Event]:
        try:
            while not self.finished:
                ev = self._process(*await self._next())
                if ev is not None:
                    yield ev
        finally:
            self.abort()

    async def collect(self) -> list[Choice]:
        """Run to completion (non-streaming). Cancelling it aborts the requests."""
        try:
            while not self.finished:
                self._process(*await self._next())
            return self.choices
        finally:
            self.abort()

    def abort(self) -> None:
        for h in self.handles:
            self.bridge.abort(h)

    def usage(self) -> dict[str, Any]:
        """Prompt tokens counted once per prompt (its first choice), outputs summed."""
        prompt = cached = 0
        seen: set[int] = set()
        for c in self.choices:
            if c.prompt_index not in seen:
                seen.add(c.prompt_index)
                prompt += c.prompt_len
                cached += c.cached
        completion = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
