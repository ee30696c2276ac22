"""Small process helpers shared by the workers."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal

import torch


def die_with_parent(socket_dir: str | None = None) -> None:
    """Ask Linux to signal this process when its parent dies, so no worker is orphaned.

    The signal is SIGKILL, or with `socket_dir` SIGHUP, whose handler first removes that
    directory (a SIGKILLed launcher cannot): only for workers whose loops never block in C, as a
    scheduler in a collective would never run a Python handler."""
    sig = signal.SIGKILL
    if socket_dir:
        sig = signal.SIGHUP
        signal.signal(sig, lambda *_: (shutil.rmtree(socket_dir, ignore_errors=True), os._exit(0)))
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
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


def h2d(t: torch.Tensor, device: str) -> torch.Tensor:
    """Host -> device copy that never synchronises the stream: a copy from pageable memory
    waits for all queued work (which would defeat overlap scheduling), one from pinned does not."""
    if device == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
