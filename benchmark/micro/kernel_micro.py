"""Launch-parameter sweep for the Triton kernels of `minisgl.kernel` at decode and prefill
shapes (Qwen3-0.6B: 16 q / 8 KV heads of 128, vocabulary 151,936), timed inside a CUDA graph.

    python benchmark/micro/kernel_micro.py
"""

# ruff: noqa: B023  (each closure is timed inside its own loop iteration)
from __future__ import annotations

import itertools
import sys

import torch
import triton
from gemm_micro import time_per_call  # the same graph-timed helper (benchmark/ on sys.path)

from minisgl.kernel import _triton_kernels as K


def per_call_us(fn, calls: int = 20) -> float:  # noqa: ANN001
    return time_per_call([fn] * calls) * 1e6


def gumbel(rows: int, vocab: int = 151936) -> None:
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16, device="cuda")
    temps = torch.full((rows,), 0.6, device="cuda")
    seeds = torch.randint(0, 2**31 - 1, (rows,), dtype=torch.int32, device="cuda")
    out = []
    for block, splits, warps in itertools.product((1024, 2048, 4096), (8, 16, 32), (4, 8)):
        chunk = -(-vocab // (splits * block)) * block
        vals = torch.empty(rows, splits, dtype=torch.float32, device="cuda")
        idx = torch.empty(rows, splits, dtype=torch.int32, device="cuda")

        def fn() -> None:
            K.gumbel_argmax_kernel[(rows, splits)](
                logits, temps, seeds, vals, idx, vocab, logits.stride(0),
                CHUNK=chunk, BLOCK=block, SPLITS=splits, FAST=True, num_warps=warps,
            )  # fmt: skip

        out.append((per_call_us(fn), block, splits, warps))
    out.sort()
    mb = logits.numel() * 2 / 1e6
    print(f"gumbel rows={rows}: " + "  ".join(
        f"{t:6.1f}us ({mb / t:4.2f} TB/s) BLOCK={b} SPLITS={s} warps={w}" for t, b, s, w in out[:4]
    ) + f"  | current (1024,16,4): {next(t for t, b, s, w in out if (b, s, w) == (1024, 16, 4)):.1f}us")  # fmt: skip


def qk_rope(tokens: int, hq: int = 16, hkv: int = 8, d: int = 128) -> None:
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")
    q = torch.empty(tokens, hq, d, dtype=torch.bfloat16, device="cuda")
    kc = torch.zeros(tokens + 64, hkv * d, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    loc = torch.randperm(tokens + 64, device="cuda")[:tokens]
    pos = torch.randint(0, 4000, (tokens,), device="cuda")
    cos_sin = torch.randn(4096, d, device="cuda")
    w = torch.ones(d, dtype=torch.bfloat16, device="cuda")
    res = []
    for g, warps in itertools.product((1, 2, 4, 8), (1, 2, 4)):

        def fn(g: int = g, warps: int = warps) -> None:
            K.qk_rope_store_kernel[(tokens, (hq + 2 * hkv) // g)](
                qkv, q, kc, vc, loc, pos, cos_sin, w, w, 1e-6, qkv.stride(0), cos_sin.stride(0),
                HQ=hq, HKV=hkv, D=d, NORM=True, G=g, num_warps=warps,
            )  # fmt: skip

        res.append((per_call_us(fn), f"heads={g} warps={warps}"))
    res.sort()
    res = [f"{t:6.1f}us {c}" for t, c in res[:5]]
    print(f"qk_rope tokens={tokens}: " + "  ".join(res))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    if "--qk-only" not in sys.argv:
        for r in (32, 160, 256):
            gumbel(r)
    for t in (32, 160, 8192):
        qk_rope(t)
