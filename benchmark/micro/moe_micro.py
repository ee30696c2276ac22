"""The MoE kernels (`minisgl.kernel.moe`) at Qwen3-30B-A3B's layer shape (128 experts, top 8,
hidden 2048, expert intermediate 768, bf16), timed inside a CUDA graph: the default tile
choice at decode and prefill sizes, the sort/pad kernels alone, and (with --sweep) the tile
configurations around it. Weight bandwidth counts each expert hit once (1.2 GB per layer
when all are hit); TFLOP/s counts 2 x 3 x H x I per (token, expert) pair.

    python benchmark/micro/moe_micro.py [--sweep] [--tp N]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from gemm_micro import time_per_call  # graph-timed helper (benchmark/ on sys.path)

from minisgl.kernel.moe import _config, fused_moe_triton, moe_align

E, TOP_K, H = 128, 8, 2048


def inputs(tokens: int, inter: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) * 0.02).bfloat16()
    probs = torch.softmax(torch.randn(tokens, E, device="cuda", generator=g), -1)
    weights, ids = torch.topk(probs, TOP_K)
    return [x, w13, w2, weights.bfloat16(), ids]


def measure(args: list[torch.Tensor], cfg: dict[str, int] | None) -> float:
    return time_per_call([lambda: fused_moe_triton(*args, config=cfg)] * 4) * 1e6


def describe(tokens: int, inter: int, us: float, ids: torch.Tensor) -> str:
    hit = ids.unique().numel()
    gb = hit * 3 * inter * H * 2 / 1e9
    tflop = 2 * 3 * H * inter * tokens * TOP_K / 1e12
    return f"{us:8.1f} us  {gb / us * 1e3:5.0f} GB/s  {tflop / us * 1e6:6.1f} TFLOP/s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep the tile configurations")
    ap.add_argument("--tp", type=int, default=1, help="the experts' intermediate split N ways")
    a = ap.parse_args()
    inter = 768 // a.tp
    print(torch.cuda.get_device_name(), "triton", triton.__version__, f"intermediate {inter}")
    for tokens in (1, 8, 32, 64, 128, 256, 512, 2048, 16384):
        args = inputs(tokens, inter)
        cfg = _config(tokens * TOP_K, E)
        ids, bm = args[4], cfg["BLOCK_M"]
        align_us = time_per_call([lambda: moe_align(ids, E, bm)] * 4) * 1e6  # noqa: B023
        us = measure(args, None)
        print(f"T={tokens:6d} default {cfg}: {describe(tokens, inter, us, args[4])}"
              f"  (sort/pad {align_us:.1f} us)")  # fmt: skip
        if not a.sweep or tokens not in (1, 64, 256, 2048, 16384):
            continue
        res = []
        for m, n, k, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4)):  # fmt: skip
            c = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=max(1, m // 8),
                     num_warps=warps, num_stages=stages)  # fmt: skip
            try:
                res.append((measure(args, c), c))
            except Exception as e:  # out of shared memory for the largest tiles
                print(f"  skip {c}: {type(e).__name__}")
        res.sort(key=lambda r: r[0])
        for us, c in res[:5]:
            print(f"    {describe(tokens, inter, us, args[4])}  {c}")


if __name__ == "__main__":
    main()
