"""A minimal synchronous client of the worker processes, for `minisgl.LLM(..., tp=N>1)` and
the interactive shell.

It starts the server's workers (launcher.Workers: scheduler ranks, detokenizer, tokenizer
workers) and plays the API server's role over the same ZMQ ipc sockets and msgpack messages
(ipc.py, bridge.py): TokenizeReq/AbortReq to the tokenizer workers, AbortReq to the detokenizer,
TextOut/ErrorOut back on `api`, Ready on `launcher` (the same ipc.Handshake). Shutdown goes
straight to scheduler0, which broadcasts it so every rank leaves its loop (no rank is left
blocked in a collective).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its atexit hook must be registered before ours)
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import zmq

from minisgl import ipc
from minisgl.args import ServerArgs
from minisgl.core import SamplingParams
from minisgl.messages import (
    AbortReq,
    ErrorOut,
    Ready,
    Shutdown,
    TextOut,
    TextOuts,
    TokenizeReq,
    decode,
)

from .launcher import Workers

POLL_MS = 200
STARTUP_TIMEOUT_S = 600.0


class WorkerDied(RuntimeError):
    pass


class WorkerClient(ipc.Handshake):
    def __init__(self, args: ServerArgs) -> None:
        self.workers = Workers(args)
        self.args = self.workers.args
        super().__init__(self.args, self.workers.limits)
        self.ctx = zmq.Context()
        self.closed = False
        self._texts: deque[TextOut] = deque()  # the rest of the last TextOuts
        atexit.register(self.close)  # before multiprocessing's hook, which joins the children
        try:
            self.open(self.ctx, self.ctx)
            self.workers.start()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.next_uid = 1
        self.worker_of: dict[int, int] = {}

    def check_alive(self) -> None:
        reason = self.workers.first_dead()
        if reason is not None:
            raise WorkerDied(f"{reason} (its log is above)")

    def _wait_ready(self) -> None:
        """Ready from every worker (ipc.Handshake)."""
        inbox = ipc.Inbox(ipc.LAUNCHER, Ready)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.expected <= self.ready:
            self.check_alive()
            if time.monotonic() > deadline:
                raise WorkerDied(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
            if self.ready_pull.poll(POLL_MS):
                inbox.dispatch(self.ready_pull.recv(), self.on_ready_msg)

    def submit(self, prompt: str | list[int], params: SamplingParams, chat: bool = False) -> int:
        """Send one request; `chat` means `prompt` is a JSON chat for the template."""
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        w = self.worker_of[uid] = uid % len(self.tok_push)
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        ipc.send(self.tok_push[w], TokenizeReq(uid, text, ids, params, chat))
        return uid

    def abort(self, uid: int) -> None:
        w = self.worker_of.pop(uid, None)
        if w is not None and not self.closed:  # same pipe as the request: never overtakes it
            ipc.send(self.tok_push[w], AbortReq(uid))
            ipc.send(self.detok_push, AbortReq(uid))

    def done(self, uid: int) -> None:
        self.worker_of.pop(uid, None)

    def recv(self) -> Any:
        """The next message on `api` (TextOut / ErrorOut / Stats; a TextOuts is handed out one
        TextOut at a time); raises if a worker died."""
        if self._texts:
            return self._texts.popleft()
        while not self.pull.poll(POLL_MS):
            self.check_alive()
        msg = decode(self.pull.recv())
        if isinstance(msg, TextOuts):
            self._texts.extend(msg.outs)
            return self._texts.popleft() if self._texts else self.recv()
        return msg

    def results(self, uid: int) -> Iterator[TextOut | ErrorOut]:
        """The TextOut / ErrorOut messages of request `uid` until it finishes."""
        while True:
            msg = self.recv()
            if not isinstance(msg, TextOut | ErrorOut) or msg.uid != uid:
                continue  # stats, or a late message of an aborted request
            yield msg
            if isinstance(msg, ErrorOut) or msg.finished is not None:
                self.done(uid)
                return

    def close(self) -> None:
        """Stop every worker (idempotent; safe from atexit and finalizers)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            if self.workers.procs and self.workers.first_dead() is None:
                ipc.send(self.sched_push, Shutdown())
                deadline = time.monotonic() + 2.0
                for r in range(self.args.tp):
                    p = self.workers.procs.get(f"scheduler{r}")
                    if p is not None:
                        p.join(max(0.0, deadline - time.monotonic()))
        except Exception:
            pass
        finally:
            self.ctx.destroy(linger=0)
            self.workers.stop()
