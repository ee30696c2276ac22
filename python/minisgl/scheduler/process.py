"""The scheduler worker: one process per TP rank. Rank 0 talks ZMQ (requests in, tokens out)
and broadcasts every incoming message to the other ranks, so all ranks schedule the same."""

from __future__ import annotations

import itertools
import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from .. import ipc, messages
from ..args import ServerArgs
from ..distributed import init_distributed
from ..engine.engine import Engine
from ..messages import AbortReq, ErrorOut, Message, Shutdown, Stats, UserReq
from ..utils import die_with_parent, exit_on_sigterm, setup_logging
from .scheduler import Scheduler

log = logging.getLogger("minisgl.scheduler")
_EARLY_ABORT_TTL = 60.0


class _Broadcaster:
    """Rank 0's messages to every rank, as msgpack bytes over a CPU (gloo) group."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=365))

    def __call__(self, msgs: list[bytes]) -> list[bytes]:
        # the count, then each message's length (so the other ranks can size the buffer), then
        # the messages; only rank 0 has any
        n = torch.tensor([len(msgs)], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.group)
        if not int(n):
            return []
        size = torch.tensor([len(m) for m in msgs] or [0] * int(n), dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        lens = size.tolist()
        buf = bytearray(b"".join(msgs)) if msgs else bytearray(sum(lens))
        dist.broadcast(torch.frombuffer(buf, dtype=torch.uint8), 0, group=self.group)
        return [bytes(buf[end - k : end]) for k, end in zip(lens, itertools.accumulate(lens))]


def run_scheduler(args: ServerArgs, rank: int) -> None:
    die_with_parent()
    exit_on_sigterm()
    setup_logging(args.log_level, f"scheduler{rank}")
    local_rank = rank - args.local_ranks.start
    if args.nnodes > 1:  # join with the global rank; the engine's GPU is the local rank
        if args.resolved_device == "cuda":
            torch.cuda.set_device(local_rank)
        host, _, port = args.dist_init_addr.rpartition(":")
        log.info("rank %d: joining the TP group of %d at %s:%s", rank, args.tp, host, port)
        init_distributed(rank, args.tp, args.resolved_device, int(port), host)
    engine = Engine(args, local_rank)
    ctx = zmq.Context()
    primary = rank == 0
    if primary:  # ZMQ's default high-water marks here (ipc.py)
        recv = ipc.pull(ctx, args.zmq_dir, ipc.SCHEDULER, hwm=None)
        send = ipc.push(ctx, args.zmq_dir, ipc.DETOKENIZER, hwm=None)

    def emit(msg: Message) -> None:
        if primary:
            ipc.send(send, msg, copy=False)

    sched = Scheduler(engine, args, emit)
    if engine.device == "cuda":
        sched.warmup()
    bcast = _Broadcaster() if args.tp > 1 else None
    info = dict(kv_tokens=engine.max_tokens_in_pool, page_size=engine.page_size,
                model_path=engine.model_path)  # fmt: skip
    # linger 0: nobody reads it on nodes other than 0, and the rank must exit anyway
    _ready = ipc.announce(ctx, args.zmq_dir, f"scheduler{rank}", info, linger=0)
    log.info("scheduler rank %d ready", rank)
    early_aborts: dict[int, float] = {}
    next_stats = 0.0
    inbox = ipc.Inbox(f"scheduler{rank}", UserReq, AbortReq, Shutdown, messages.FlushCache)
    cap = args.max_waiting_tokens
    while True:
        raw: list[bytes] = []
        if primary:
            # block briefly when idle; never block while there is work on the device
            if sched.busy or recv.poll(timeout=100):
                while recv.poll(0):
                    raw.append(recv.recv())
        if bcast is not None:
            try:
                raw = bcast(raw)
            except RuntimeError as e:  # gloo: a peer's connection closed
                log.error("rank %d lost the TP group (a rank stopped or died): %s", rank, e)
                raise SystemExit(1) from None
        for data in raw:
            msg = inbox.decode(data)
            if isinstance(msg, Shutdown):
                log.info("scheduler rank %d shutting down", rank)
                return
            if isinstance(msg, messages.FlushCache):  # every rank decides alike: same requests
                ok, mem, free = not sched.reqs, sched.mem, sched.mem.pages.num_free
                if ok:
                    mem.ensure_free(mem.pages.num_pages)  # evicts every unlocked cache entry
                emit(messages.FlushCache(ok, (mem.pages.num_free - free) * mem.ps))
            elif isinstance(msg, AbortReq):
                if not sched.abort(msg.uid):
                    early_aborts[msg.uid] = time.monotonic()
            elif isinstance(msg, UserReq):
                if early_aborts.pop(msg.uid, None) is not None:
                    continue
                n = len(msg.input_ids)
                if cap and sched.waiting_tokens + n > cap:  # 400: this prompt alone is too long
                    why = f"{sched.waiting_tokens} prompt tokens are waiting (--max-waiting-tokens {cap})"
                    emit(ErrorOut(msg.uid, f"the server is busy: {why}", 429 if n <= cap else 400))
                    continue
                err = sched.add(msg.uid, msg.input_ids, msg.params)  # checked by decode
                if err is not None:
                    emit(ErrorOut(msg.uid, err, 400))
        if sched.busy:
            sched.step()
        now = time.monotonic()
        if now >= next_stats:
            next_stats = now + 0.5
            emit(Stats(sched.stats()))
            for uid in [u for u, t in early_aborts.items() if now - t > _EARLY_ABORT_TTL]:
                del early_aborts[uid]
