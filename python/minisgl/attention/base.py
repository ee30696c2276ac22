"""Attention backend interface and the per-step metadata every backend receives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..kvcache.pool import KVPool
from ..kvcache.slots import SlotTable


@dataclass
class AttnMeta:
    """Device tensors describing one forward batch (B requests, T new tokens)."""

    is_prefill: bool
    rows: torch.Tensor  # [B] int64 row of each request in the slot table
    prefix_lens: torch.Tensor  # [B] int64 tokens already cached
    extend_lens: torch.Tensor  # [B] int64 tokens computed now
    seq_lens: torch.Tensor  # [B] int64 prefix + extend
    out_loc: torch.Tensor  # [T] int64 slots receiving the new K/V
    # the same lengths on the host, for backends that loop or plan on the CPU
    prefix_lens_host: list[int]
    extend_lens_host: list[int]
    rows_host: list[int]

    @property
    def seq_lens_host(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens_host, self.extend_lens_host)]


class AttentionBackend(ABC):
    def __init__(
        self, pool: KVPool, slots: SlotTable, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        # the device table for kernels that gather on the GPU, the host copy for planning
        self.pool, self.slot_table, self.host_slots = pool, slots.device, slots.np
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.meta: AttnMeta | None = None

    def prepare(self, meta: AttnMeta) -> None:
        """Called once per batch before the forward (planning, index building)."""
        self.meta = meta

    def kv_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K buffer, V buffer, slots) where the model writes this batch's K/V itself."""
        return self.pool.k[layer], self.pool.v[layer], self.meta.out_loc

    def store_kv(self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        from ..kernel import store_kv

        if k is None:  # the model stored them already (fused RoPE + store kernel)
            return
        store_kv(self.pool.k[layer], self.pool.v[layer], self.meta.out_loc, k, v)

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: int
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KV, D] for the new tokens (None: already in the cache, see
        `kv_target`); returns [T, H, D]."""

    # CUDA-graph support (decode only); backends that cannot be captured keep the defaults
    supports_graph: bool = False

    def init_graph(self, max_bs: int) -> None:
        raise NotImplementedError

    # `buf` picks one of two independent sets of planning buffers, so the next step can be
    # planned (on a copy stream) while the graph using the other set still runs
    def prepare_graph_capture(self, bs: int, meta: AttnMeta, buf: int = 0) -> None:
        raise NotImplementedError

    def prepare_graph_replay(self, bs: int, meta: AttnMeta, buf: int = 0) -> None:
        raise NotImplementedError
