"""The API server's side of the ZMQ plumbing: submit requests, route results, track readiness.

Sockets (all ipc, in the launcher's private directory):
  api        PULL, bound here: TextOut / ErrorOut / Stats from the detokenizer, ErrorOut from
             tokenizer workers
  launcher   PULL, bound here: Ready from every worker
  tokenizer-i  PUSH, one per tokenizer worker (round-robin; an abort follows its request's
             worker so it reaches the scheduler after the request itself)
  detokenizer  PUSH: AbortReq, so the detokenizer frees its state at once

Liveness: the scheduler's Stats (every 0.5 s) and the other workers' Heartbeats stamp `beats`;
a worker silent for STALL_S is reported by `stalled()` (/health answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from minisgl.args import ServerArgs
from minisgl.core import SamplingParams
from minisgl.messages import (
    STALL_S,
    AbortReq,
    ErrorOut,
    FlushCache,
    Heartbeat,
    Inbox,
    Ready,
    Stats,
    TextOut,
    TokenizeReq,
    encode,
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
    t_last: float = 0.0
    num_tokens: int = 0


class Bridge:
    def __init__(self, args: ServerArgs, metrics: Metrics) -> None:
        self.args = args
        self.metrics = metrics
        self.reqs: dict[int, ReqHandle] = {}
        self.next_uid = 1
        self._rr = 0
        self.expected = {f"scheduler{r}" for r in args.local_ranks} | {"detokenizer"}
        self.expected |= {f"tokenizer-{i}" for i in range(args.num_tokenizer)}
        self.ready: set[str] = set()
        self.info: dict[str, Any] = {}  # from the scheduler: max_seq_len, vocab_size, ...
        self.tokenizer_info: dict[str, Any] = {}
        self.dead: str | None = None  # why the server can no longer serve
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_ready: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        self._flush: asyncio.Future | None = None
        self.beats: dict[str, float] = {}  # worker -> last sign of life (monotonic)
        self.queued = 0  # admitted choices without output yet (generation.py)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        d = self.args.zmq_dir
        self.ctx = zmq.asyncio.Context()  # receiving side, awaited in the event loop
        self.sctx = zmq.Context()  # sending side: PUSH with no HWM never blocks
        self.pull = self._socket(zmq.PULL, f"ipc://{d}/api", bind=True)
        self.ready_pull = self._socket(zmq.PULL, f"ipc://{d}/launcher", bind=True)
        self.tok_push = [
            self._socket(zmq.PUSH, f"ipc://{d}/tokenizer-{i}")
            for i in range(self.args.num_tokenizer)
        ]
        self.detok_push = self._socket(zmq.PUSH, f"ipc://{d}/detokenizer")
        self.sched_push = self._socket(zmq.PUSH, f"ipc://{d}/scheduler")  # FlushCache only
        self._tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._ready_loop()),
        ]

    def _socket(self, kind: int, addr: str, bind: bool = False) -> Any:
        s = (self.ctx if kind == zmq.PULL else self.sctx).socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, 0)
        s.bind(addr) if bind else s.connect(addr)
        return s

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.ctx.destroy(linger=0)
        self.sctx.destroy(linger=0)

    @property
    def is_ready(self) -> bool:
        return self.dead is None and self.expected <= self.ready

    @property
    def max_seq_len(self) -> int:
        return int(self.info.get("max_seq_len", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.info.get("vocab_size", 0))

    def stalled(self) -> list[str]:
        now, beats = time.monotonic(), self.beats
        late = {name for name, t in beats.items() if now - t > STALL_S}
        # Stats travel through the detokenizer: a scheduler silent since the detokenizer's
        # last heartbeat may well be fine, and the detokenizer the one stuck
        if "scheduler0" in late and beats.get("detokenizer", 0) - beats["scheduler0"] < 1:
            late = late - {"scheduler0"} | {"detokenizer"}
        return sorted(late)

    async def _ready_loop(self) -> None:
        inbox = Inbox("launcher", Ready)
        while True:
            inbox.dispatch(await self.ready_pull.recv(), self._on_ready)

    def _on_ready(self, msg: Ready) -> None:
        name = msg.name
        if name not in self.expected:
            return
        logger.info("worker ready: %s", name)
        if name == "scheduler0":
            self.info = dict(msg.info)
            config = encode(Ready("config", self.info))
            for s in self.tok_push:  # tokenizers validate lengths/ids with these
                s.send(config)
        elif name.startswith("tokenizer-"):
            self.tokenizer_info = dict(msg.info)
        if not name.startswith("scheduler") or name == "scheduler0":  # rank 0 speaks for all
            self.beats[name] = time.monotonic()
        self.ready.add(name)
        if self.is_ready:
            for cb in self.on_ready:
                cb()

    # ---- requests -----------------------------------------------------------------------
    def submit(
        self,
        queue: asyncio.Queue,
        index: int,
        prompt: str | list[int],
        params: SamplingParams,
        chat: bool = False,
        fill: bool = False,
    ) -> ReqHandle:
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        worker, self._rr = self._rr, (self._rr + 1) % len(self.tok_push)
        h = ReqHandle(uid, index, queue, worker)
        if self.dead is not None:  # a worker died after this request passed the ready check
            queue.put_nowait((index, ErrorOut(uid, f"request failed: {self.dead}", 503)))
            return h
        self.reqs[uid] = h
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        self.tok_push[worker].send(encode(TokenizeReq(uid, text, ids, params, chat, fill)))
        self.metrics.running.inc()
        return h

    def abort(self, h: ReqHandle, reason: str = "abort") -> None:
        """Drop a request that is still running (client gone; reason "stop": a stop string)."""
        if self.reqs.pop(h.uid, None) is None:
            return
        self.metrics.running.dec()
        self.metrics.finished.labels(reason).inc()
        if self.dead is None:
            self.tok_push[h.worker].send(encode(AbortReq(h.uid)))
            self.detok_push.send(encode(AbortReq(h.uid)))

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
            self.sched_push.send(encode(FlushCache()))
        return await asyncio.wait_for(asyncio.shield(self._flush), timeout)

    async def _recv_loop(self) -> None:
        inbox = Inbox("api", TextOut, ErrorOut, Stats, Heartbeat, FlushCache)
        while True:
            inbox.dispatch(await self.pull.recv(), self._on_result)

    def _on_result(self, msg: Any) -> None:
        m = self.metrics
        if isinstance(msg, TextOut):
            h = self.reqs.get(msg.uid)
            if h is None:
                return  # aborted or failed already
            now = time.perf_counter()
            if h.num_tokens == 0:
                m.ttft.observe(now - h.t_start)
                m.prompt_tokens.inc(max(msg.prompt_len, 0))
            else:
                m.itl.observe((now - h.t_last) / max(len(msg.token_ids), 1))
            h.t_last = now
            h.num_tokens += len(msg.token_ids)
            m.generation_tokens.inc(len(msg.token_ids))
            if msg.finished is not None:
                del self.reqs[msg.uid]
                m.running.dec()
                m.finished.labels(msg.finished).inc()
                m.e2e.observe(now - h.t_start)
            h.queue.put_nowait((h.index, msg))
        elif isinstance(msg, ErrorOut):
            h = self.reqs.pop(msg.uid, None)
            if h is not None:
                m.running.dec()
                m.finished.labels("error").inc()
                h.queue.put_nowait((h.index, msg))
        elif isinstance(msg, Stats):
            self.beats["scheduler0"] = time.monotonic()
            m.engine.update(msg.values)
        elif isinstance(msg, FlushCache):
            if self._flush and not self._flush.done():
                self._flush.set_result(msg)
        elif msg.name in self.beats:  # Heartbeat
            self.beats[msg.name] = time.monotonic()
