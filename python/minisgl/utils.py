"""Small process helpers shared by the workers."""

from __future__ import annotations

import ctypes
import logging
import os
import signal


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no worker is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"[%(asctime)s {name}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
