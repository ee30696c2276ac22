"""The launcher of a node other than 0 in a multi-node TP group: its scheduler ranks, nothing else.

Node 0 runs the API server, tokenizers, detokenizer and ranks 0..L-1 (L = tp / nnodes); node R
runs `python -m minisgl ... --node-rank R`, which starts ranks R*L..R*L+L-1 only. The ranks meet
at --dist-init-addr (torch.distributed's store on rank 0), and rank 0 broadcasts every scheduler
message to them, so node R needs no other connection to node 0.

A rank that dies, or loses the group because a rank elsewhere died (gloo sees the closed
connection), exits non-zero: this launcher stops its other ranks and exits 1. When node 0 shuts
down cleanly it broadcasts Shutdown: every rank exits 0 and so does this launcher. SIGINT or
SIGTERM stops the local ranks (node 0 then loses the group) and exits 0.
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
