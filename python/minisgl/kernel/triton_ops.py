"""Triton kernels for the two places where a decode step ran a chain of small kernels:
q/k RMSNorm + RoPE + KV-cache store (six kernels per layer, with copies of strided views),
and sampling (cast, softmax, noise, divide and two argmaxes over the 152K-entry vocabulary).
Only for CUDA tensors when triton imports; the torch code they replace stays the CPU path
and the reference the GPU tests compare against."""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch

from .. import env


@functools.cache
def _kernels() -> ModuleType | None:
    if env.disable_kernels():
        return None
    try:
        from . import _triton_kernels
    except ImportError:  # no triton
        return None
    return _triton_kernels


# heads per program of the q/k/RoPE kernel and its warps: 8 and 4 were fastest at 32, 160 and
# 8192 tokens on the H100 (2.1 us at 160, 49 us at 8192; one head per program: ~2x / 3x slower)
# (read once: the launch sizes of a kernel that runs for every layer of every step)
_HEADS_PER_PROGRAM, _QK_WARPS = env.qk_heads(), env.qk_warps()
# the CPU tests may run the kernels in triton's interpreter (TRITON_INTERPRET=1, read at start)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    return (x.is_cuda or _INTERPRET) and _kernels() is not None


def fits_qk_norm_rope_store(qkv: torch.Tensor, head_dim: int) -> bool:
    """The kernel rotates halves with tl.arange: 16-bit, power-of-two head sizes from 32."""
    pow2 = head_dim >= 32 and head_dim & (head_dim - 1) == 0
    return pow2 and qkv.dtype != torch.float32 and available(qkv)


def qk_norm_rope_store(
    qkv: torch.Tensor, pos: torch.Tensor, cos_sin: torch.Tensor, q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
    loc: torch.Tensor, num_heads: int, num_kv_heads: int,
) -> torch.Tensor:  # fmt: skip
    """From the fused projection `qkv` ([T, (H + 2 KV) * D]): q/k RMSNorm (when weights are
    given), neox RoPE at `pos`, K and V written to the cache slots `loc`; returns q [T, H, D]."""
    t, d = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    norm = q_weight is not None
    g = math.gcd(num_heads, num_kv_heads, _HEADS_PER_PROGRAM)
    _kernels().qk_rope_store_kernel[(t, (num_heads + 2 * num_kv_heads) // g)](
        qkv, q, k_cache, v_cache, loc, pos, cos_sin,
        q_weight if norm else qkv, k_weight if norm else qkv, eps,
        qkv.stride(0), cos_sin.stride(0),
        HQ=num_heads, HKV=num_kv_heads, D=d, NORM=norm, G=g, num_warps=_QK_WARPS,
    )  # fmt: skip
    return q


def gumbel_sample(
    logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor,
    rows: torch.Tensor | None = None, next_tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One token per row: argmax for temperature 0, else a draw from softmax(logits / T) whose
    noise depends only on the row's seed (int32) and the column, not on the rest of the batch.
    With `rows`, token i is also stored at `next_tokens[rows[i]]`; with `out` (int64 [n]) the
    tokens are written there instead of a new tensor."""
    n, vocab = logits.shape
    splits, block = 16, 2048  # measured fastest at 160 rows (benchmark/micro/kernel_micro.py)
    chunk = -(-vocab // (splits * block)) * block
    vals = torch.empty(n, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(n, splits, dtype=torch.int32, device=logits.device)
    k = _kernels()
    k.gumbel_argmax_kernel[(n, splits)](
        logits, temps, seeds, vals, idx, vocab, logits.stride(0),
        CHUNK=chunk, BLOCK=block, SPLITS=splits, FAST=logits.is_cuda, num_warps=4,
    )  # fmt: skip
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device) if out is None else out
    scatter = rows is not None
    k.gumbel_finish_kernel[(n,)](
        vals, idx, tokens, rows if scatter else tokens, next_tokens if scatter else tokens,
        SPLITS=splits, SCATTER=scatter, num_warps=1,
    )  # fmt: skip
    return tokens


def decode_prologue(
    meta: torch.Tensor, next_tokens: torch.Tensor, slot_table: torch.Tensor, input_ids: torch.Tensor,
    rows: torch.Tensor, positions: torch.Tensor, out_loc: torch.Tensor,
) -> None:  # fmt: skip
    """From int32 `meta` rows (request row, position, new slot; [>=3, bs]): int64 `rows`,
    `positions`, `out_loc`, `input_ids[i] = next_tokens[rows[i]]`, and
    `slot_table[rows[i], positions[i]] = out_loc[i]`; one kernel instead of five."""
    bs = meta.shape[1]
    _kernels().decode_prologue_kernel[(-(-bs // 256),)](
        meta, meta.stride(0), next_tokens, slot_table, slot_table.stride(0), input_ids, rows,
        positions, out_loc, bs, BLOCK=256, num_warps=4,
    )  # fmt: skip
