"""Launcher: start the worker processes, serve HTTP in this process, watch, and tear down.

Process layout (all children use the multiprocessing 'spawn' context):
  main        launcher + FastAPI/uvicorn API server (this process)
  scheduler{r}  one per TP rank (minisgl.scheduler.process.run_scheduler)
  detokenizer   token ids -> text deltas
  tokenizer-i   text/chat -> token ids (--num-tokenizer of them)
They talk over ZMQ ipc sockets (ipc.py) in a private directory (tempfile.mkdtemp), removed at
exit; every worker announces itself with a Ready message (ipc.Handshake).

A watchdog thread polls the children every 0.2 s. If one dies, /health turns 503, every
in-flight request fails, the other children are stopped and the launcher exits with status 1.
SIGINT/SIGTERM stop every child (terminate, then kill) within a few seconds and exit 0.

`run_node`: the launcher of a node other than 0 in a multi-node TP group: its scheduler ranks,
nothing else. Node R starts ranks R*L..R*L+L-1 (L = tp / nnodes); they meet node 0's at
--dist-init-addr and get every scheduler message from rank 0's broadcast. A rank that dies or
loses the group (a rank elsewhere died: gloo sees the closed connection) exits non-zero: the
node stops and exits 1. Node 0's clean stop broadcasts Shutdown: every rank, and this launcher,
exit 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from minisgl.args import ServerArgs
from minisgl.messages import Limits, Shutdown

logger = logging.getLogger("minisgl.server")

POLL_S = 0.2
DEATH_GRACE_S = 1.0  # keep answering 503 this long after a crash before exiting


def _child_main(kind: str, args: ServerArgs, index: int, limits: Limits) -> None:
    """Entry of every child process."""
    from minisgl.utils import die_with_parent, exit_on_sigterm, setup_logging

    short = {"scheduler": f"sched{index}", "detokenizer": "detok"}.get(kind, f"tok{index}")
    try:  # the name ps/top show (/proc/PID/comm, 15 bytes at most)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(15, f"minisgl:{short}".encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
    die_with_parent(None if kind == "scheduler" else args.zmq_dir)
    exit_on_sigterm()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops us
    if kind == "scheduler":
        from minisgl.scheduler.process import run_scheduler

        run_scheduler(args, index)
    elif kind == "detokenizer":
        from .detokenizer import run_detokenizer

        setup_logging(args.log_level, "detokenizer")
        run_detokenizer(args)
    else:
        from .tokenizer import run_tokenizer

        setup_logging(args.log_level, f"tokenizer-{index}")
        run_tokenizer(args, index, limits)


class Workers:
    """The child processes and their socket directory. The model is resolved here, once: the
    workers get its directory (a hub id's snapshot) and the tokenizers the `Limits` prompts are
    checked against, read from its config.json, at spawn."""

    def __init__(self, args: ServerArgs) -> None:
        from minisgl.models.config import ModelConfig, resolve_model_path

        model = resolve_model_path(args.model)
        cfg = ModelConfig.from_dir(model)
        self.limits = Limits(cfg.context_len(args.max_seq_len), cfg.vocab_size)
        self.dir = tempfile.mkdtemp(prefix="minisgl-")
        dist_port = args.dist_port
        if args.tp > 1 and args.nnodes == 1 and not dist_port:  # rendezvous of the TP ranks
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                dist_port = sock.getsockname()[1]
        self.args = args.replace(zmq_dir=self.dir, dist_port=dist_port, model=model,
                                 served_model_name=args.model_name)  # fmt: skip
        self.procs: dict[str, Any] = {}
        self.stopping = False

    def child_env(self, kind: str) -> dict[str, str]:
        """Thread limits for a child (its environment is fixed when it is spawned).

        OpenMP threads busy-wait between parallel regions: a CPU scheduler using every core
        starves the API and detokenizer processes and each token pays for it (70 ms instead of
        2 ms per token on 2 cores). So tokenizer workers and the detokenizer get one thread, and
        a CPU scheduler leaves two cores to the rest. Variables the user set win.
        """
        if kind != "scheduler":
            env = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        elif self.args.resolved_device == "cpu":
            affinity = getattr(os, "sched_getaffinity", None)
            cores = len(affinity(0)) if affinity else os.cpu_count()
            threads = max(1, (cores or 1) // len(self.args.local_ranks) - 2)
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        else:
            env = {}
        return {k: v for k, v in env.items() if k not in os.environ}

    @staticmethod
    def _quiet_resource_tracker() -> None:
        """Start multiprocessing's resource tracker without its 'leaked semaphore' warning.

        Workers are stopped with SIGTERM/SIGKILL, so a lock some library made in a worker
        (tqdm does) is never unregistered; the tracker still removes it, but warns at exit.
        """
        from multiprocessing import resource_tracker

        opt = "ignore:resource_tracker:UserWarning"
        sys.warnoptions.append(opt)  # passed to the tracker's interpreter as -W
        try:
            resource_tracker.ensure_running()
        except Exception:
            pass
        finally:
            sys.warnoptions.remove(opt)

    def start(self) -> None:
        self._quiet_resource_tracker()
        ctx = mp.get_context("spawn")
        jobs = [(f"scheduler{r}", "scheduler", r) for r in self.args.local_ranks]
        if self.args.node_rank == 0:  # other nodes run scheduler ranks only
            jobs.append(("detokenizer", "detokenizer", 0))
            jobs += [(f"tokenizer-{i}", "tokenizer", i) for i in range(self.args.num_tokenizer)]
        for name, kind, index in jobs:
            p = ctx.Process(target=_child_main, args=(kind, self.args, index, self.limits),
                            name=f"minisgl-{name}")  # fmt: skip
            env = self.child_env(kind)
            os.environ.update(env)
            try:
                p.start()
            finally:
                for k in env:
                    os.environ.pop(k, None)
            self.procs[name] = p
            logger.info("started %s (pid %d)", name, p.pid)

    def _shutdown_group(self) -> None:
        """Shutdown to scheduler0, broadcast to every rank: the other nodes exit 0, not 1."""
        import zmq

        from minisgl import ipc

        ctx = zmq.Context()
        sock = ipc.push(ctx, self.dir, ipc.SCHEDULER, hwm=None)  # kept until destroy(linger=0)
        ipc.send(sock, Shutdown())
        self.procs["scheduler0"].join(2.0)
        ctx.destroy(linger=0)

    def first_dead(self) -> str | None:
        for name, p in self.procs.items():
            if not p.is_alive():
                return f"worker {name} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self, timeout: float = 2.5) -> None:
        self.stopping = True
        if self.args.nnodes > 1 and self.args.node_rank == 0 and self.first_dead() is None:
            self._shutdown_group()
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for name, p in self.procs.items():
            if p.is_alive():
                logger.warning("%s did not stop in %.1f s: killing it", name, timeout)
                p.kill()
                p.join(1.0)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_server(args: ServerArgs) -> int:
    """Start everything, serve until a signal or a worker death; return the exit status."""
    import uvicorn

    from minisgl.utils import setup_logging

    from .api_server import create_app
    from .bridge import Bridge
    from .connection import HttpProtocol
    from .metrics import Metrics

    setup_logging(args.log_level, "server")
    workers = Workers(args)
    args = workers.args
    bridge = Bridge(args, Metrics(), workers.limits)
    state = {"status": 0, "signal": None}

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not workers.stopping:
                logger.info("received %s: shutting down", signal.Signals(sig).name)
            workers.stopping = True
            state["signal"] = sig
            loop = bridge.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(bridge.fail_all, "the server is shutting down", 503)
            super().handle_exit(sig, frame)

    # uvicorn's own startup lines ("Uvicorn running on ...") come before the workers are ready:
    # only `announce` below says where to connect, and only when it is worth it
    server = Server(uvicorn.Config(
        create_app(args, bridge), http=HttpProtocol, host=args.host, port=args.port, lifespan="on",
        log_level=args.log_level if args.log_level != "info" else "warning",
        access_log=args.log_level == "debug", timeout_graceful_shutdown=1,
    ))  # fmt: skip

    def on_signal(sig: int, frame: Any) -> None:
        # before uvicorn takes over the handlers, and again when it re-raises after its exit
        if not server.started and not workers.stopping:
            workers.stopping = True
            raise SystemExit(0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def announce() -> None:
        if not server.started:  # the workers were faster than the socket bind
            bridge.loop.call_later(0.05, announce)
            return
        logger.info(
            "ready: serving %r at http://%s:%d (context %d tokens, %d tokenizer worker(s), tp %d)",
            args.model_name, args.host, args.port, workers.limits.max_seq_len, args.num_tokenizer,
            args.tp,
        )  # fmt: skip

    bridge.on_ready = announce

    def watchdog() -> None:
        while not workers.stopping and (reason := workers.first_dead()) is None:
            time.sleep(POLL_S)
        if workers.stopping:
            return
        logger.error("%s: stopping the server", reason)
        state["status"] = 1
        died = time.monotonic()
        loop = bridge.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(bridge.mark_dead, reason)
        else:
            bridge.dead = reason
        workers.stop()
        time.sleep(max(0.0, DEATH_GRACE_S - (time.monotonic() - died)))
        server.should_exit = True

    try:
        logger.info("starting workers (sockets in %s)", workers.dir)
        workers.start()
        threading.Thread(target=watchdog, name="minisgl-watchdog", daemon=True).start()
        server.run()
        if not server.started and state["status"] == 0 and state["signal"] is None:
            state["status"] = 1  # could not bind the port, or startup failed
    except SystemExit as e:
        if e.code not in (0, None):
            state["status"] = 1
    finally:
        workers.stop()
    logger.info("stopped (exit status %d)", state["status"])
    return int(state["status"])


def run_node(args: ServerArgs) -> int:
    """Run this node's scheduler ranks until a signal, a death or node 0's Shutdown."""
    from minisgl.utils import setup_logging

    setup_logging(args.log_level, f"node{args.node_rank}")
    stop: list[int] = []
    signal.signal(signal.SIGINT, lambda sig, frame: stop.append(sig))
    signal.signal(signal.SIGTERM, lambda sig, frame: stop.append(sig))
    workers, ranks, status = Workers(args), args.local_ranks, 0
    logger.info(
        "node %d of %d: TP ranks %d..%d of %d, rendezvous at %s",
        args.node_rank, args.nnodes, ranks[0], ranks[-1], args.tp, args.dist_init_addr,
    )  # fmt: skip
    try:
        workers.start()
        while not stop and (reason := workers.first_dead()) is None:
            time.sleep(POLL_S)
        if stop:
            logger.info("received %s: shutting down", signal.Signals(stop[0]).name)
        else:
            for p in workers.procs.values():  # a Shutdown broadcast ends every rank at once
                p.join(2.0)
            if all(p.exitcode == 0 for p in workers.procs.values()):
                logger.info("node 0 shut the TP group down")
            else:
                logger.error("%s: stopping this node", reason)
                status = 1
    finally:
        workers.stop()
    logger.info("stopped (exit status %d)", status)
    return status
