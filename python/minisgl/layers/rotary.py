"""Rotary position embedding (neox layout: element i rotates with i + d/2), with Llama-3
frequency scaling and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernel.fused import fused_ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # float32 like transformers, so positions far out round the same way
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
        # [max_pos, head_dim]: cos in the first half, sin in the second. A plain attribute, not
        # a buffer, so that casting the model to 16 bits leaves it float32
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def forward(
        self, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fi = fused_ops(q, multiple=64)  # FlashInfer's RoPE: head_dim 64, 128, 256, 512
        if fi is not None:  # rotates q and k in place
            n, d = q.shape[0], q.shape[-1]
            fi.rope.apply_rope_with_cos_sin_cache_inplace(
                pos, q.view(n, -1), k.view(n, -1), d, self.cos_sin
            )
            return q, k
        cos, sin = self.cos_sin[pos].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, d/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
