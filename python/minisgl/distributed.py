"""Tensor-parallel process group: rank/size and the two collectives the model needs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1


_TP = TPInfo()


def get_tp_info() -> TPInfo:
    return _TP


def init_distributed(rank: int, size: int, device: str, port: int, host: str = "127.0.0.1") -> None:
    """Join the TP group once per process: on several nodes the scheduler joins first (global
    rank, node 0's address) and the engine's call, with the local rank for the GPU, is a no-op."""
    global _TP
    if dist.is_initialized():
        return
    _TP = TPInfo(rank, size)
    if size == 1:
        return
    backend = "nccl" if device == "cuda" else "gloo"
    init: dict = {"init_method": f"tcp://{host}:{port}"}
    if host.startswith("127."):  # one node: all of it on loopback (torch's TCPStore listens on
        # every interface unless handed a socket; gloo / NCCL pick theirs from the host name)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        fd = socket.create_server((host, port)).detach() if rank == 0 else None
        init = {"store": dist.TCPStore(host, port, size, rank == 0, master_listen_fd=fd)}
    dist.init_process_group(backend, rank=rank, world_size=size, **init)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
