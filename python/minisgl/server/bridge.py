"""The API server's side of the ZMQ plumbing (ipc.py; ipc.Handshake opens the sockets and
tracks readiness): requests go round-robin to the tokenizer workers; an abort follows its
request's worker, so it reaches the scheduler after the request itself, and goes to the
detokenizer, which frees its state at once. Results arrive on `api`.

Liveness: the scheduler's Stats (every 0.5 s) and the other workers' Heartbeats stamp `beats`;
a worker silent for STALL_S is reported by `stalled()` (/health answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from minisgl import ipc
from minisgl.args import ServerArgs
from minisgl.core import SamplingParams
from minisgl.messages import (
    STALL_S,
    AbortReq,
    ErrorOut,
    FlushCache,
    Heartbeat,
    Limits,
    Ready,
    Stats,
    TextOut,
    TextOuts,
    TokenizeReq,
)

from .metrics import Metrics

logger = logging.getLogger("minisgl.server")


@dataclass(eq=False)
class ReqHandle:
    """One engine request (one choice of one prompt) as seen by the API server."""

    uid: int
    index: int  # choice index inside its HTTP request
    queue: asyncio.Queue  # shared by the choices of one HTTP request: (index, TextOut|ErrorOut)
    worker: int
    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0  # of its latest output (0: none yet)


class Bridge(ipc.Handshake):
    def __init__(self, args: ServerArgs, metrics: Metrics, limits: Limits) -> None:
        super().__init__(args, limits)
        self.args = args
        self.metrics = metrics
        self.reqs: dict[int, ReqHandle] = {}
        self.next_uid = 1
        self.dead: str | None = None  # why the server can no longer serve
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_ready: Callable[[], None] | None = None  # called once every worker is ready
        self._tasks: list[asyncio.Task] = []
        self._flush: asyncio.Future | None = None
        self.beats: dict[str, float] = {}  # worker -> last sign of life (monotonic)
        self.queued = 0  # admitted choices without output yet (generation.py)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.asyncio.Context()  # receiving side, awaited in the event loop
        self.sctx = zmq.Context()  # sending side: PUSH with no HWM never blocks
        self.open(self.ctx, self.sctx)
        inbox = ipc.Inbox(ipc.API, TextOuts, ErrorOut, Stats, Heartbeat, FlushCache)
        ready = ipc.Inbox(ipc.LAUNCHER, Ready)
        self._tasks = [
            asyncio.create_task(ipc.aserve(self.pull, inbox, self._on_result)),
            asyncio.create_task(ipc.aserve(self.ready_pull, ready, self._on_ready)),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.ctx.destroy(linger=0)
        self.sctx.destroy(linger=0)

    @property
    def is_ready(self) -> bool:
        return self.dead is None and self.expected <= self.ready

    def stalled(self) -> list[str]:
        now, beats = time.monotonic(), self.beats
        late = {name for name, t in beats.items() if now - t > STALL_S}
        # Stats travel through the detokenizer: a scheduler silent since the detokenizer's
        # last heartbeat may well be fine, and the detokenizer the one stuck
        if "scheduler0" in late and beats.get("detokenizer", 0) - beats["scheduler0"] < 1:
            late = late - {"scheduler0"} | {"detokenizer"}
        return sorted(late)

    def _on_ready(self, msg: Ready) -> None:
        if not self.on_ready_msg(msg):
            return
        logger.info("worker ready: %s", msg.name)
        if not msg.name.startswith("scheduler") or msg.name == "scheduler0":  # rank 0 for all
            self.beats[msg.name] = time.monotonic()
        if self.is_ready and self.on_ready is not None:
            self.on_ready()

    # ---- requests -----------------------------------------------------------------------
    def submit(
        self, queue: asyncio.Queue, index: int, prompt: str | list[int], params: SamplingParams,
        chat: bool = False, fill: bool = False,
    ) -> ReqHandle:  # fmt: skip
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        worker = (uid - 1) % len(self.tok_push)  # round robin: uids count up from 1
        h = ReqHandle(uid, index, queue, worker)
        if self.dead is not None:  # a worker died after this request passed the ready check
            queue.put_nowait((index, ErrorOut(uid, f"request failed: {self.dead}", 503)))
            return h
        self.reqs[uid] = h
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        ipc.send(self.tok_push[worker], TokenizeReq(uid, text, ids, params, chat, fill))
        self.metrics.running.inc()
        return h

    def abort(self, h: ReqHandle, reason: str = "abort") -> None:
        """Drop a request that is still running (client gone; reason "stop": a stop string)."""
        if self._end(h.uid, reason) is not None and self.dead is None:
            ipc.send(self.tok_push[h.worker], AbortReq(h.uid))
            ipc.send(self.detok_push, AbortReq(h.uid))

    def _end(self, uid: int, reason: str) -> ReqHandle | None:
        """Forget a request and count how it ended; None if it had ended already."""
        h = self.reqs.pop(uid, None)
        if h is not None:
            self.metrics.running.dec()
            self.metrics.finished.labels(reason).inc()
        return h

    def fail_all(self, message: str, status: int = 503) -> None:
        """Every in-flight request gets an error (a worker died, or shutdown)."""
        for uid, h in list(self.reqs.items()):
            h.queue.put_nowait((h.index, ErrorOut(uid, message, status)))
        self.metrics.running.dec(len(self.reqs))
        self.reqs.clear()

    def mark_dead(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
            logger.error("server can no longer serve: %s", reason)
        self.fail_all(f"request failed: {reason}", 503)

    async def flush_cache(self, timeout: float = 10.0) -> FlushCache:
        """Ask the scheduler to empty its prefix cache; concurrent callers share one answer."""
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_future()
            ipc.send(self.sched_push, FlushCache())
        return await asyncio.wait_for(asyncio.shield(self._flush), timeout)

    def _on_text(self, msg: TextOut, now: float) -> None:
        h, m = self.reqs.get(msg.uid), self.metrics
        if h is None:
            return  # aborted or failed already
        if h.t_last == 0.0:
            m.ttft.observe(now - h.t_start)
            m.prompt_tokens.inc(max(msg.prompt_len, 0))
        else:
            m.itl.observe((now - h.t_last) / max(len(msg.token_ids), 1))
        h.t_last = now
        m.generation_tokens.inc(len(msg.token_ids))
        if msg.finished is not None:
            self._end(msg.uid, msg.finished)
            m.e2e.observe(now - h.t_start)
        h.queue.put_nowait((h.index, msg))

    def _on_result(self, msg: Any) -> None:
        if isinstance(msg, TextOuts):
            now = time.perf_counter()
            for out in msg.outs:
                self._on_text(out, now)
        elif isinstance(msg, ErrorOut):
            if (h := self._end(msg.uid, "error")) is not None:
                h.queue.put_nowait((h.index, msg))
        elif isinstance(msg, Stats):
            self.beats["scheduler0"] = time.monotonic()
            self.metrics.engine.update(msg.values)
        elif isinstance(msg, FlushCache):
            if self._flush and not self._flush.done():
                self._flush.set_result(msg)
        elif msg.name in self.beats:  # Heartbeat
            self.beats[msg.name] = time.monotonic()
