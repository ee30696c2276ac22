"""Decode-shaped GEMMs (y = x W^T, M = batch rows) on the GPU: cuBLAS (torch) against a Triton
split-K kernel over a grid of tile configurations. Prints, per (shape, M), the time and the
weight bandwidth of cuBLAS and of the best few Triton configurations.

    python benchmark/micro/gemm_micro.py [--config-json qwen3-0.6b.json] [--ms 16,64,160,256]
"""
# ruff: noqa: ANN001, ANN201

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def gemm_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, M, N, K, k_per,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    k0 = pid_k * k_per
    xp = x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :]
    wp = w_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_per, BK):
        a = tl.load(xp, mask=offs_m[:, None] < M, other=0.0)
        b = tl.load(wp, mask=offs_n[:, None] < N, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        xp += BK
        wp += BK
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if PARTIAL:
        tl.store(ws_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)


@triton.jit
def reduce_kernel(ws_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def triton_gemm(x, w, cfg, y=None, ws=None):  # noqa: ANN001, ANN201
    bm, bn, bk, split, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if y is None else y
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    if split > 1:
        ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if ws is None else ws
    gemm_kernel[grid](
        x, w, y, ws if split > 1 else y, m, n, k, k // split,
        BM=bm, BN=bn, BK=bk, PARTIAL=split > 1, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split > 1:
        reduce_kernel[(triton.cdiv(m * n, 1024),)](ws, y, m * n, SPLIT=split, BLOCK=1024)
    return y


def configs(m: int, k: int) -> list[tuple]:
    out = []
    for bm, bn, bk, split, stages in itertools.product(
        (16, 32, 64, 128), (32, 64, 128), (128, 256), (1, 2, 4, 8), (4,)
    ):
        if bm > max(16, triton.next_power_of_2(m)) or k % (split * bk):
            continue
        warps = 4 if bm * bn <= 64 * 64 else 8
        out.append((bm, bn, bk, split, warps, stages))
    return out


def time_per_call(fns: list) -> float:
    """Seconds per call, the calls captured back to back in one CUDA graph: no launch
    overhead, and each call reads its own weight copy, so nothing is served from L2."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (10 * len(fns))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-json", default="../shared/configs/qwen3-0.6b.json")
    ap.add_argument("--ms", default="16,64,128,160,256")
    ap.add_argument("--top", type=int, default=3, help="Triton configs to show (0: skip Triton)")
    args = ap.parse_args()
    cfg = json.load(open(args.config_json))
    h, hd = (
        cfg["hidden_size"],
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
    )
    nh, nkv, inter = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["intermediate_size"],
    )
    shapes = {
        "qkv": ((nh + 2 * nkv) * hd, h),
        "o": (h, nh * hd),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (cfg["vocab_size"], h),
    }
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        ws_all = [
            torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)
        ]
        w = ws_all[0]
        for m in (int(s) for s in args.ms.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = x @ w.t()
            y = torch.empty(m, n, dtype=x.dtype, device="cuda")
            fns = [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in ws_all]
            t_cublas = time_per_call(fns)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t_lt = time_per_call(fns)
            torch.backends.cuda.preferred_blas_library("cublas")
            results = []
            for c in configs(m, k) if args.top else []:
                ws = torch.empty(c[3], m, n, dtype=torch.float32, device="cuda")
                try:
                    out = triton_gemm(x, w, c, y, ws)
                except Exception as e:  # out of shared memory etc.
                    print(f"  skip {c}: {type(e).__name__}", file=sys.stderr)
                    continue
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if err > 2e-2:
                    print(f"  WRONG {c}: rel err {err:.2e}")
                    continue
                t = time_per_call(
                    [lambda w=w, c=c, x=x, y=y, ws=ws: triton_gemm(x, w, c, y, ws) for w in ws_all]
                )
                results.append((t, c))
            results.sort()
            best = "  ".join(
                f"{t * 1e6:6.1f}us {nbytes / t / 1e12:4.2f}TB/s {c}" for t, c in results[: args.top]
            )
            print(f"{name:8s} N={n:6d} K={k:5d} M={m:4d}  cublas {t_cublas * 1e6:6.1f}us "
                  f"{nbytes / t_cublas / 1e12:4.2f}TB/s  cublasLt {t_lt * 1e6:6.1f}us "
                  f"{nbytes / t_lt / 1e12:4.2f}TB/s | triton {best}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
