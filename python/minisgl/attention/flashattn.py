"""FlashAttention (`flash_attn_interface` = FA3 on Hopper, else `flash_attn` = FA2) over the
paged pool through a block table. Not verified on a GPU here: no wheel of either package
reaches the GPU machine this project is measured on (see docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kvcache.pool import KVPool
from ..kvcache.slots import SlotTable
from .base import AttentionBackend, AttnMeta


def _import_varlen() -> Callable[..., torch.Tensor]:
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as e:
            raise ImportError(
                "--attn fa needs FlashAttention: install flash-attn (FA2) or flash_attn_interface "
                "(FA3, built from the flash-attention repository's hopper/ directory)"
            ) from e
    return flash_attn_varlen_func


class FlashAttentionBackend(AttentionBackend):
    def __init__(
        self, pool: KVPool, slots: SlotTable, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        super().__init__(pool, slots, num_heads, num_kv_heads, head_dim)
        self.varlen = _import_varlen()
        self.ps = pool.page_size

    def prepare(self, meta: AttnMeta) -> None:
        self.meta = meta
        dev = self.pool.k.device
        max_seq = max(meta.seq_lens_host)
        cols = torch.arange(0, max_seq, self.ps, device=dev)
        self.block_table = (self.slot_table[meta.rows][:, cols] // self.ps).to(torch.int32)
        zero = torch.zeros(1, dtype=torch.int32, device=dev)
        self.cu_q = torch.cat([zero, meta.extend_lens.cumsum(0).to(torch.int32)])
        self.cu_k = torch.cat([zero, meta.seq_lens.cumsum(0).to(torch.int32)])
        self.max_q, self.max_k = max(meta.extend_lens_host), max_seq

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: int
    ) -> torch.Tensor:
        self.store_kv(layer, k, v)
        kc, vc = self.pool.paged(layer)
        out = self.varlen(
            q, kc, vc, self.cu_q, self.cu_k, self.max_q, self.max_k,
            softmax_scale=self.scale, causal=True, block_table=self.block_table,
        )  # fmt: skip
        return out[0] if isinstance(out, tuple) else out
