"""Launcher of a node other than 0 in a multi-node TP group: its scheduler ranks, nothing else.

Node R starts ranks R*L..R*L+L-1 (L = tp / nnodes); they meet node 0's at --dist-init-addr and
get every scheduler message from rank 0's broadcast. A rank that dies or loses the group (a rank
elsewhere died: gloo sees the closed connection) exits non-zero: the node stops and exits 1.
Node 0's clean stop broadcasts Shutdown: every rank, and this launcher, exit 0.
"""

from __future__ import annotations

import logging
import signal
import time

from minisgl.args import ServerArgs

from .launcher import POLL_S, Workers

logger = logging.getLogger("minisgl.server")


def run_node(args: ServerArgs) -> int:
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
