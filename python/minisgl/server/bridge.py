"""The API server's side of the ZMQ plumbing: submit requests, route results, track readiness.

Sockets (all ipc, in the launcher's private directory):
  api        PULL, bound here: TextOut / ErrorOut / Stats from the detokenizer, ErrorOut from
             tokenizer workers
  launcher   PULL, bound here: Ready from every worker
  tokenizer-i  PUSH, one per tokenizer worker (round-robin; an abort follows its request's
             worker so it reaches the scheduler after the request itself)
  detokenizer  PUSH: AbortReq, so the detokenizer frees its state at once
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
from minisgl.messages import (
    AbortReq,
    ErrorOut,
    Ready,
    Stats,
    TextOut,
    TokenizeReq,
    decode,
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
        self.expected = {f"scheduler{r}" for r in range(args.tp)} | {"detokenizer"}
        self.expected |= {f"tokenizer-{i}" for i in range(args.num_tokenizer)}
        self.ready: set[str] = set()
        self.info: dict[str, Any] = {}  # from the scheduler: max_seq_len, vocab_size, ...
        self.tokenizer_info: dict[str, Any] = {}
        self.dead: str | None = None  # why the server can no longer serve
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_ready: list[Any] = []
        self._tasks: list[asyncio.Task] = []

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

    async def _ready_loop(self) -> None:
        while True:
            msg = decode(await self.ready_pull.recv())
            if not isinstance(msg, Ready):
                continue
            name = "scheduler0" if msg.name == "scheduler" else msg.name
            logger.info("worker ready: %s", name)
            if name == "scheduler0":
                self.info = dict(msg.info)
                config = encode(Ready("config", self.info))
                for s in self.tok_push:  # tokenizers validate lengths/ids with these
                    s.send(config)
            elif name.startswith("tokenizer-"):
                self.tokenizer_info = dict(msg.info)
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
        params: dict[str, Any],
        chat: bool = False,
    ) -> ReqHandle:
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        worker, self._rr = self._rr, (self._rr + 1) % len(self.tok_push)
        h = ReqHandle(uid, index, queue, worker)
        if self.dead is not None:  # a worker died after this request passed the ready check
            queue.put_nowait((index, ErrorOut(uid, f"request failed: {self.dead}", 503)))
            return h
        self.reqs[uid] = h
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        self.tok_push[worker].send(encode(TokenizeReq(uid, text, ids, params, chat)))
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

    async def _recv_loop(self) -> None:
        m = self.metrics
        while True:
            frames = await self.pull.recv()
            try:
                msg = decode(frames)
            except Exception as e:
                logger.error("undecodable message dropped: %s", e)
                continue
            if isinstance(msg, TextOut):
                h = self.reqs.get(msg.uid)
                if h is None:
                    continue  # aborted or failed already
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
                m.engine.update(msg.values)
