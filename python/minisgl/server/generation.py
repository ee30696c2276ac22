"""One HTTP request's engine requests (n choices x prompts): admission, fair submission, stop
strings, streaming, timeouts and aborts.

Over --max-choices, or over --max-waiting-requests choices without output server-wide: 400 / 429
before anything is submitted. At most a quarter of --max-running-requests choices of one request
run at once (so a small request beside a big one starts at once), choice 0 of every prompt first
(so a bad prompt is usually an HTTP error, not a broken stream). Stop strings: one KMP automaton
each, fed only new characters: O(new chars x stops) per token, whatever the lengths.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from minisgl.core import SamplingParams
from minisgl.messages import ErrorOut, Logprob, TextOut

from .bridge import Bridge, ReqHandle


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@lru_cache(maxsize=1024)
def _failure(s: str) -> tuple[int, ...]:
    """KMP failure function: f[i] = length of the longest proper border of s[: i + 1]."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        k += s[i] == s[k]
        f[i] = k
    return tuple(f)


class StopMatcher:
    """`states[j]`: length of the longest prefix of stop j that the text ends with."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.fail = stops, [_failure(s) for s in stops]
        self.states = [0] * len(stops)

    def feed(self, new: str, base: int) -> int:
        """Advance over `new` (at offset `base` of the text); return where the earliest stop
        string completed in it starts, or -1."""
        hit = -1
        for j, (s, f) in enumerate(zip(self.stops, self.fail)):
            k = self.states[j]
            for pos, ch in enumerate(new):
                while k and s[k] != ch:
                    k = f[k - 1]
                if s[k] == ch:
                    k += 1
                    if k == len(s):
                        start = base + pos + 1 - k
                        hit = start if hit < 0 else min(hit, start)
                        break
            self.states[j] = k
        return hit

    @property
    def holdback(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        return max(self.states, default=0)


@dataclass
class Choice:
    """Output state of one engine request; `text` is already trimmed at a stop string."""

    index: int
    prompt_index: int
    stop: StopMatcher
    text: str = ""
    sent: int = 0  # chars of `text` already handed out
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_len: int = 0
    cached: int = 0
    _lp_start: list[int] = field(default_factory=list)  # per logprob entry: len(text) before it
    _lp_sent: int = 0

    def feed(self, msg: TextOut) -> tuple[str, list[Logprob]]:
        """Take one TextOut; return (text delta safe to emit now, logprob entries of the text
        emitted so far: those of a stop string and of an EOS that adds no text never are)."""
        self.token_ids += msg.token_ids
        new_lps = [lp for lp in msg.logprobs if lp is not None]
        self.logprobs += new_lps
        self._lp_start += [len(self.text)] * len(new_lps)
        self.prompt_len, self.cached = msg.prompt_len, msg.cached
        base = len(self.text)
        self.text += msg.text
        done = msg.finished is not None
        hit = self.stop.feed(msg.text, base) if self.stop.stops else -1
        if hit >= 0:
            self.text = self.text[:hit]
            self.finish_reason, done = "stop", True
            del self.logprobs[bisect_left(self._lp_start, hit) :]
        if msg.finished is not None and self.finish_reason is None:
            self.finish_reason = msg.finished
            last = self.logprobs[-1].text if msg.finished == "stop" and self.logprobs else None
            if last is not None and not (last and self.text.endswith(last)):
                self.logprobs.pop()  # the stop token's text is not in the output
        end = len(self.text) if done else len(self.text) - self.stop.holdback
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        n = len(self.logprobs) if done else bisect_left(self._lp_start, self.sent)
        lps, self._lp_sent = self.logprobs[self._lp_sent : n], max(n, self._lp_sent)
        return delta, lps

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    choice: Choice
    delta: str
    logprobs: list[Logprob]
    finished: bool


class Generation:
    """Admits and submits every choice (see the module docstring), waits until each submitted
    choice has answered once (so an input error becomes an HTTP error, not a broken stream),
    then yields events until all choices finish."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list[ReqHandle | None] = []
        self.choices: list[Choice] = []
        self._specs: list[tuple[tuple[int, int], str | list[int], SamplingParams, bool, bool]] = []
        self._todo: deque[int] = deque()  # choices not submitted yet, in submission order
        self._unstarted: set[int] = set()  # admitted choices without output (server-wide cap)
        self._active = 0
        self._buffer: deque[tuple[int, Any]] = deque()
        self.window = max(1, bridge.args.max_running_requests // 4)
        self.timeout = bridge.args.request_timeout
        self.deadline = time.monotonic() + self.timeout if self.timeout > 0 else None

    def add(
        self, prompt_index: int, prompt: str | list[int], params: SamplingParams, stops: list[str],
        chat: bool, fill: bool = False,
    ) -> None:  # fmt: skip
        """One choice; `fill`: no max_tokens was asked (messages.TokenizeReq)."""
        rank = sum(c.prompt_index == prompt_index for c in self.choices)  # choice-major order
        self.choices.append(Choice(len(self.choices), prompt_index, StopMatcher(list(stops or []))))
        self.handles.append(None)
        self._specs.append(((rank, prompt_index), prompt, params, chat, fill))

    def _admit(self) -> None:
        a, k, queued = self.bridge.args, len(self.choices), self.bridge.queued
        cap = min(a.max_choices, a.max_waiting_requests)
        if k > cap:
            flag = "--max-choices" if cap == a.max_choices else "--max-waiting-requests"
            raise ApiError(400, f"{k} choices (prompts x n) in one request; {flag} is {cap}", "n")
        if queued + k > a.max_waiting_requests:
            raise ApiError(429, f"the server is busy: {queued} choices are waiting for their first "
                           f"token (--max-waiting-requests {a.max_waiting_requests})")  # fmt: skip
        self.bridge.queued += k
        self._unstarted = set(range(k))
        self._todo = deque(sorted(range(k), key=lambda i: self._specs[i][0]))

    def _submit(self) -> None:
        while self._todo and self._active < self.window:
            i = self._todo.popleft()
            _, prompt, params, chat, fill = self._specs[i]
            self.handles[i] = self.bridge.submit(self.queue, i, prompt, params, chat, fill)
            self._active += 1

    async def start(self) -> None:
        try:
            self._admit()
            self._submit()
            waiting = {i for i, h in enumerate(self.handles) if h is not None}
            while waiting:
                index, msg = await self._get()
                if isinstance(msg, ErrorOut):
                    raise ApiError(msg.status, msg.message)
                waiting.discard(index)
                self._buffer.append((index, msg))
        except BaseException:
            self.abort()
            raise

    async def _get(self) -> tuple[int, Any]:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            index, msg = await asyncio.wait_for(self.queue.get(), left)
        except TimeoutError:
            raise ApiError(504, f"timed out after {self.timeout:g} s (--request-timeout)") from None
        return self._took(index, msg)

    def _took(self, index: int, msg: Any) -> tuple[int, Any]:
        if index in self._unstarted:
            self._unstarted.discard(index)
            self.bridge.queued -= 1
        return index, msg

    def _ready(self) -> tuple[int, Any] | None:
        """An output that is already here, without waiting."""
        if self._buffer:
            return self._buffer.popleft()
        return None if self.queue.empty() else self._took(*self.queue.get_nowait())

    def _process(self, index: int, msg: Any) -> Event | None:
        c = self.choices[index]
        if c.done:
            return None  # late output after a stop string
        if isinstance(msg, ErrorOut):
            raise ApiError(msg.status, msg.message)
        delta, lps = c.feed(msg)
        if c.done:
            self.bridge.abort(self.handles[index], "stop")  # no-op unless a stop string hit
            self._active -= 1
            self._submit()
        return Event(c, delta, lps, c.done)

    async def _next(self) -> tuple[int, Any]:
        return self._buffer.popleft() if self._buffer else await self._get()

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)

    async def events(self) -> AsyncIterator[Event]:
        """One event per choice with new output. Outputs that queued up while the stream was
        behind are merged into one event per choice: under load a stream sends one chunk with
        several tokens instead of a chunk per token, since each chunk (JSON, the ASGI send
        chain, a socket write) costs ~3/4 of the API server's time per token (py-spy, CPU)."""
        try:
            while not self.finished:
                evs: dict[int, Event] = {}
                try:
                    self._merge(evs, self._process(*await self._next()))
                    while not self.finished and (ready := self._ready()) is not None:
                        self._merge(evs, self._process(*ready))
                except ApiError:
                    for ev in evs.values():  # what came before the error still goes out
                        yield ev
                    raise
                for ev in evs.values():
                    yield ev
        finally:
            self.abort()

    @staticmethod
    def _merge(evs: dict[int, Event], ev: Event | None) -> None:
        if ev is not None and (old := evs.setdefault(ev.choice.index, ev)) is not ev:
            old.delta += ev.delta
            old.logprobs = old.logprobs + ev.logprobs
            old.finished = ev.finished

    async def collect(self) -> list[Choice]:
        """Run to completion (non-streaming). Cancelling it aborts the requests."""
        async for _ in self.events():
            pass
        return self.choices

    def abort(self) -> None:
        for h in self.handles:
            if h is not None:
                self.bridge.abort(h)
        self._todo.clear()
        self.bridge.queued -= len(self._unstarted)
        self._unstarted.clear()

    def usage(self) -> dict[str, Any]:
        """Prompt tokens counted once per prompt (its first choice), outputs summed."""
        firsts = {c.prompt_index: c for c in reversed(self.choices)}.values()
        prompt, cached = sum(c.prompt_len for c in firsts), sum(c.cached for c in firsts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
