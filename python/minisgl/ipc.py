"""The ZMQ plumbing between the processes: socket names, PUSH/PULL helpers, receive loops and
the one ready handshake. No other module spells an `ipc://` address.

Every link is one-way, PUSH -> PULL, over an ipc socket in the launcher's private directory
(`args.zmq_dir`). A socket is named after its one reader, which binds it; writers connect, so
a worker can start before or after the peers it writes to:

  scheduler     scheduler rank 0: UserReq/AbortReq (tokenizers), FlushCache (API), Shutdown
  detokenizer   TokenOut/ErrorOut/Stats/FlushCache (rank 0), AbortReq (API)
  tokenizer-i   tokenizer worker i: TokenizeReq/AbortReq (API)
  api           API server or WorkerClient: TextOuts/ErrorOut/Stats/FlushCache, Heartbeats
  launcher      API server or WorkerClient: Ready from every worker

The request and result paths run without a high-water mark (`hwm=0`): a burst is queued, never
dropped, and a send never blocks. The scheduler's own sockets and the one-shot Ready senders
keep ZMQ's defaults (`hwm=None`).

`Inbox` is the receive side of every loop: it decodes, and drops bad frames (and frames whose
handler failed) with a warning at most once a second. `Inbox.serve` is a worker's loop, which
also sends its Heartbeat; `aserve` is the API server's (asyncio) loop.

Readiness: every worker sends `Ready(name, info)` once to `launcher` when it can serve
(`announce`). `Handshake`, the API role shared by the API server's Bridge and the
WorkerClient, opens its sockets and collects them, with the model's `Limits` that the launcher
read at spawn and scheduler rank 0's info (kv_tokens, page_size, model_path). Scheduler ranks
on other nodes announce to their own node's launcher, where nobody reads: rank 0 speaks for all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from .messages import HEARTBEAT_S, BadFrame, Heartbeat, Limits, Message, Ready, decode, encode

SCHEDULER, DETOKENIZER, API, LAUNCHER = "scheduler", "detokenizer", "api", "launcher"
Sock = Any  # a zmq (or zmq.asyncio) socket


def tokenizer(index: int) -> str:
    """The socket (and worker) name of tokenizer worker `index`."""
    return f"tokenizer-{index}"


def _open(ctx: Any, kind: int, d: str, name: str, hwm: int | None, linger: int | None) -> Sock:
    s = ctx.socket(kind)
    if linger is not None:
        s.setsockopt(zmq.LINGER, linger)
    if hwm is not None:
        s.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, hwm)
    (s.bind if kind == zmq.PULL else s.connect)(f"ipc://{d}/{name}")
    return s


def pull(ctx: Any, zmq_dir: str, name: str, hwm: int | None = 0, linger: int | None = None) -> Sock:
    """Bind the PULL socket `name`: this process is its reader."""
    return _open(ctx, zmq.PULL, zmq_dir, name, hwm, linger)


def push(ctx: Any, zmq_dir: str, name: str, hwm: int | None = 0, linger: int | None = None) -> Sock:
    """Connect a PUSH socket to `name`."""
    return _open(ctx, zmq.PUSH, zmq_dir, name, hwm, linger)


def send(sock: Sock, msg: Message, copy: bool = True) -> None:
    sock.send(encode(msg), copy=copy)


def announce(ctx: Any, zmq_dir: str, name: str, info: dict, linger: int | None = None) -> Sock:
    """A worker's side of the handshake: Ready(name, info) to `launcher`. The caller keeps the
    socket: closing it could drop the message before the connection is made."""
    s = push(ctx, zmq_dir, LAUNCHER, hwm=None, linger=linger)
    send(s, Ready(name, info))
    return s


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

    def serve(self, sock: Sock, handle: Callable[[Any], None], beat_to: Sock) -> None:
        """A worker's loop over a zmq PULL socket, forever; a Heartbeat named after this inbox
        goes to the `beat_to` socket every HEARTBEAT_S."""
        beat, next_beat = encode(Heartbeat(self.where)), 0.0
        while True:
            if sock.poll(100):  # wake up now and then so a SIGTERM handler can run
                self.dispatch(sock.recv(), handle)
            if time.monotonic() >= next_beat:
                beat_to.send(beat)
                next_beat = time.monotonic() + HEARTBEAT_S


async def aserve(sock: Sock, inbox: Inbox, handle: Callable[[Any], None]) -> None:
    """The asyncio loop over a zmq.asyncio PULL socket, forever (until cancelled)."""
    while True:
        inbox.dispatch(await sock.recv(), handle)


class Handshake:
    """The API role (API server or WorkerClient): its sockets, and the readiness of this node's
    workers (see the module docstring)."""

    def __init__(self, args: Any, limits: Limits) -> None:
        self.zmq_dir, self.num_tokenizer, self.limits = args.zmq_dir, args.num_tokenizer, limits
        self.expected = {f"scheduler{r}" for r in args.local_ranks} | {DETOKENIZER}
        self.expected |= {tokenizer(i) for i in range(args.num_tokenizer)}
        self.ready: set[str] = set()
        self.info: dict[str, Any] = {}  # from scheduler0: kv_tokens, page_size, model_path
        self.tokenizer_info: dict[str, Any] = {}  # has_tokenizer, has_chat_template

    def open(self, ctx: Any, sctx: Any) -> None:
        """PULL at `api` and `launcher` on `ctx`, PUSH to the workers on `sctx` (linger 0)."""
        d = self.zmq_dir
        self.pull, self.ready_pull = pull(ctx, d, API, linger=0), pull(ctx, d, LAUNCHER, linger=0)
        self.tok_push = [push(sctx, d, tokenizer(i), linger=0) for i in range(self.num_tokenizer)]
        self.detok_push = push(sctx, d, DETOKENIZER, linger=0)
        self.sched_push = push(sctx, d, SCHEDULER, linger=0)  # FlushCache, Shutdown

    def on_ready_msg(self, msg: Ready) -> bool:
        """Record one Ready; False (and ignored) for a name that is no worker of ours."""
        if msg.name not in self.expected:
            return False
        if msg.name == "scheduler0":
            self.info = dict(msg.info)
        elif msg.name.startswith("tokenizer-"):
            self.tokenizer_info = dict(msg.info)
        self.ready.add(msg.name)
        return True
