"""Triton kernels for the two places where a decode step ran a chain of small kernels:
q/k RMSNorm + RoPE + KV-cache store (six kernels per layer, with copies of strided views),
and sampling (cast, softmax, noise, divide and two argmaxes over the 152K-entry vocabulary).
Only for CUDA tensors when triton imports; the torch code they replace stays the CPU path
and the reference the GPU tests compare against."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


@functools.cache
def _triton() -> Any:  # noqa: ANN401
    if os.environ.get("MINISGL_DISABLE_KERNELS"):
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return _build()


def available(x: torch.Tensor) -> bool:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # lets the CPU tests run them
    return (x.is_cuda or interpret) and _triton() is not None


def _build() -> Any:  # noqa: ANN401, C901
    import triton
    import triton.language as tl

    @triton.jit
    def qk_rope_store_kernel(
        qkv, q_out, k_cache, v_cache, loc, pos, cos_sin, q_w, k_w, eps,
        qkv_stride, cs_stride,
        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        h = tl.program_id(1)  # q heads, then k heads, then v heads
        half: tl.constexpr = D // 2
        offs = tl.arange(0, half)
        src = qkv + t * qkv_stride + h * D
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + half + offs).to(tl.float32)
        slot = tl.load(loc + t)
        if h >= HQ + HKV:  # V: stored as is
            dst = v_cache + slot * (HKV * D) + (h - HQ - HKV) * D
            tl.store(dst + offs, x1.to(v_cache.dtype.element_ty))
            tl.store(dst + half + offs, x2.to(v_cache.dtype.element_ty))
        else:
            if NORM:  # round like the torch path: normalise, to 16 bits, times the weight
                r = tl.rsqrt((tl.sum(x1 * x1) + tl.sum(x2 * x2)) / D + eps)
                if h < HQ:
                    w1, w2 = tl.load(q_w + offs), tl.load(q_w + half + offs)
                else:
                    w1, w2 = tl.load(k_w + offs), tl.load(k_w + half + offs)
                x1 = (w1 * (x1 * r).to(w1.dtype)).to(tl.float32)
                x2 = (w2 * (x2 * r).to(w2.dtype)).to(tl.float32)
            p = tl.load(pos + t)
            cos = tl.load(cos_sin + p * cs_stride + offs)
            sin = tl.load(cos_sin + p * cs_stride + half + offs)
            y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            if h < HQ:
                dst = q_out + t * (HQ * D) + h * D
            else:
                dst = k_cache + slot * (HKV * D) + (h - HQ) * D
            tl.store(dst + offs, y1.to(q_out.dtype.element_ty))
            tl.store(dst + half + offs, y2.to(q_out.dtype.element_ty))

    @triton.jit
    def gumbel_argmax_kernel(
        logits, temps, seeds, out_val, out_idx, V, stride, CHUNK: tl.constexpr,
        BLOCK: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        split = tl.program_id(1)
        t = tl.load(temps + row)
        inv_t = 1.0 / tl.where(t > 0, t, 1.0)
        seed = tl.load(seeds + row)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK], tl.int32)
        start = split * CHUNK
        for off in range(start, start + CHUNK, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(logits + row * stride + cols, mask=ok, other=float("-inf"))
            x = x.to(tl.float32)
            if t > 0:  # Gumbel-max: argmax(logits / T + G) is a draw from softmax(logits / T)
                u = tl.rand(seed, cols)
                x = x * inv_t - tl.log(-tl.log(u))
            better = x > best  # strict: earlier columns win ties
            best = tl.where(better, x, best)
            best_i = tl.where(better, cols, best_i)
        m = tl.max(best, axis=0)
        i = tl.min(tl.where(best == m, best_i, 2147483647), axis=0)
        tl.store(out_val + row * SPLITS + split, m)
        tl.store(out_idx + row * SPLITS + split, i)

    return qk_rope_store_kernel, gumbel_argmax_kernel


def qk_norm_rope_store(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    loc: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """From the fused projection `qkv` ([T, (H + 2 KV) * D]): q/k RMSNorm (when weights are
    given), neox RoPE at `pos`, K and V written to the cache slots `loc`; returns q [T, H, D]."""
    kernel = _triton()[0]
    t, d = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    norm = q_weight is not None
    kernel[(t, num_heads + 2 * num_kv_heads)](
        qkv, q, k_cache, v_cache, loc, pos, cos_sin,
        q_weight if norm else qkv, k_weight if norm else qkv, eps,
        qkv.stride(0), cos_sin.stride(0),
        HQ=num_heads, HKV=num_kv_heads, D=d, NORM=norm, num_warps=1,
    )  # fmt: skip
    return q


def gumbel_sample(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax for temperature 0, else a draw from softmax(logits / T) whose
    noise depends only on the row's seed (int32) and the column, not on the rest of the batch."""
    kernel = _triton()[1]
    rows, vocab = logits.shape
    splits, block = 16, 1024
    chunk = -(-vocab // (splits * block)) * block
    vals = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    kernel[(rows, splits)](
        logits, temps, seeds, vals, idx, vocab, logits.stride(0),
        CHUNK=chunk, BLOCK=block, SPLITS=splits, num_warps=4,
    )  # fmt: skip
    return idx.gather(1, vals.argmax(dim=1, keepdim=True)).squeeze(1).long()
