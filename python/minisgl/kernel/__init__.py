"""Custom kernels with torch fallbacks. CUDA versions are JIT-compiled on first use."""

from __future__ import annotations

import torch


def store_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Scatter the new tokens' K/V (`[T, KV, D]`) into the pool at slots `loc` (`[T]`)."""
    k_buf[loc] = k
    v_buf[loc] = v
