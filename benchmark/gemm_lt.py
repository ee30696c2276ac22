"""Decode-shaped GEMMs: torch's cuBLAS call against every algorithm cuBLASLt's heuristic lists
for the shape (`minisgl.kernel.cublaslt`), each timed back to back inside a CUDA graph with its
own weight copies (cold L2, as in a decode step). Prints per (GEMM, M) torch's time, the
heuristic's first choice and the fastest listed algorithm, and per M the four per-layer GEMMs
summed.

    python benchmark/gemm_lt.py [--config-json qwen3-0.6b.json] [--ms 16,64,160,256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm_micro import time_per_call  # noqa: E402

from minisgl.kernel import cublaslt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-json", default="../shared/configs/qwen3-0.6b.json")
    ap.add_argument("--ms", default="8,32,64,96,128,160,192,224,256")
    args = ap.parse_args()
    cfg = json.load(open(args.config_json))
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, inter = cfg.get("head_dim") or h // nh, cfg["intermediate_size"]
    shapes = {
        "qkv": ((nh + 2 * nkv) * hd, h), "o": (h, nh * hd),
        "gate_up": (2 * inter, h), "down": (h, inter), "lm_head": (cfg["vocab_size"], h),
    }  # fmt: skip
    mod = cublaslt.module()
    assert mod is not None, "cuBLASLt module did not build"
    ws = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    torch.manual_seed(0)
    per_layer: dict[int, list[float]] = {}
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        weights = [
            torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)
        ]
        for m in (int(s) for s in args.ms.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = torch.nn.functional.linear(x, weights[0]).float()
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            t_torch = time_per_call(
                [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in weights]
            )
            times = []
            for a in range(mod.lt_num_algos(x, weights[0], ws, m)):
                try:
                    mod.lt_gemm(y, x, weights[0], ws, m, a)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} M={m} algo {a}: {type(e).__name__}", file=sys.stderr)
                    continue
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2:
                    print(f"  {name} M={m} algo {a}: WRONG, rel err {err:.1e}")
                    continue
                fns = [
                    lambda w=w, a=a, x=x, y=y, m=m: mod.lt_gemm(y, x, w, ws, m, a) for w in weights
                ]
                times.append((time_per_call(fns), a))
            first = next((t for t, a in times if a == 0), float("nan"))
            best, idx = min(times)
            print(f"{name:8s} N={n:6d} K={k:5d} M={m:4d}  torch {t_torch * 1e6:6.1f}us  "
                  f"lt[0] {first * 1e6:6.1f}us  best lt[{idx:2d}] {best * 1e6:6.1f}us "
                  f"({nbytes / best / 1e12:4.2f} TB/s, {t_torch / best:4.2f}x of {len(times)})",
                  flush=True)  # fmt: skip
            if name != "lm_head":
                acc = per_layer.setdefault(m, [0.0, 0.0])
                acc[0] += t_torch
                acc[1] += best
    for m, (t, b) in per_layer.items():
        print(f"M={m:4d}: 4 layer GEMMs torch {t * 1e6:6.1f}us, tuned {b * 1e6:6.1f}us "
              f"(x28 layers: -{(t - b) * 28e3:.3f} ms per step)")  # fmt: skip


if __name__ == "__main__":
    main()
