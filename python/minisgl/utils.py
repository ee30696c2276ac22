"""Small process helpers shared by the workers."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal

import torch


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies, so no worker is orphaned."""
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


def exit_on_sigterm(socket_dir: str | None = None) -> None:
    """Exit at once on SIGTERM. If the parent is gone by then (a SIGKILLed launcher cannot clean
    up), first remove `socket_dir`: workers whose loops never block in C get SIGTERM as their
    parent-death signal for this, schedulers keep SIGKILL (a collective would never return)."""
    parent = os.getppid()

    def bye(*_: object) -> None:
        if socket_dir and os.getppid() != parent:
            shutil.rmtree(socket_dir, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, bye)


def h2d(t: torch.Tensor, device: str) -> torch.Tensor:
    """Host -> device copy that never synchronises the stream: a copy from pageable memory
    waits for all queued work (which would defeat overlap scheduling), one from pinned does not."""
    if device == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def env_flag(name: str) -> bool:
    """A boolean MINISGL_* switch: 1/true/yes/on enable it; unset, empty, 0/false/no/off do not."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1/0, true/false, yes/no or on/off")
