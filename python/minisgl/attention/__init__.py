"""Attention backend registry: `--attn` picks one backend, or a `prefill,decode` pair."""

from __future__ import annotations

import torch

from ..kvcache.pool import KVPool
from ..kvcache.slots import SlotTable
from .base import AttentionBackend, AttnMeta
from .torch_backend import TorchBackend


def _flashinfer() -> type[AttentionBackend]:
    from .flashinfer import FlashInferBackend

    return FlashInferBackend


def _flashattn() -> type[AttentionBackend]:
    from .flashattn import FlashAttentionBackend

    return FlashAttentionBackend


BACKENDS = {"torch": lambda: TorchBackend, "fi": _flashinfer, "fa": _flashattn}


def create_backend(
    name: str, device: str, pool: KVPool, slots: SlotTable, num_heads: int, num_kv_heads: int,
    head_dim: int,
) -> AttentionBackend:  # fmt: skip
    if name == "auto":  # FlashInfer where its kernels exist, else the portable backend
        fast = device == "cuda" and head_dim in (64, 128, 256) and pool.k.dtype != torch.float32
        name = "fi" if fast else "torch"
    parts = name.split(",")
    if len(parts) > 2 or any(p not in BACKENDS for p in parts):
        raise ValueError(
            f"--attn {name!r}: choose auto, {', '.join(BACKENDS)} or a prefill,decode pair like fa,fi"
        )
    if device == "cpu" and parts != ["torch"]:
        raise ValueError(f"--attn {name!r} needs a GPU; on CPU use --attn torch")
    made = [
        BACKENDS[p]()(pool, slots, num_heads, num_kv_heads, head_dim) for p in dict.fromkeys(parts)
    ]
    if len(made) == 1:
        return made[0]
    from .hybrid import HybridBackend

    return HybridBackend(made[0], made[1])


__all__ = ["AttentionBackend", "AttnMeta", "create_backend", "BACKENDS"]
