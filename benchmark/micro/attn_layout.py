"""Decode attention against the device's read bandwidth: FlashInfer's CUDA-core decode kernel
(Qwen3-0.6B heads: 16 q / 8 KV / 128, bf16, page 64) at a mid-run batch of the standard
workload, with the KV pool laid out NHD (a page holds [tokens, heads, dim]) or HND ([heads,
tokens, dim]: one head's tokens contiguous), pages in allocation order or shuffled; next to a
plain read (`sum`) and copy of the same number of bytes.

    python benchmark/micro/attn_layout.py [--bs 160] [--layers 28]
"""

from __future__ import annotations

import argparse

import flashinfer
import torch

H, KV, D, PS = 16, 8, 128, 64


def graph_time(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Median seconds of one `fn()` replayed from a CUDA graph (no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[reps // 2]


def bandwidth(nbytes: int) -> None:
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    out = torch.empty((), dtype=torch.float32, device="cuda")
    t = graph_time(lambda: torch.sum(x, 0, dtype=torch.float32, out=out))
    print(f"read (sum)       {t * 1e3:7.3f} ms  {nbytes / t / 1e12:5.2f} TB/s")
    half = x[: x.numel() // 2]
    y = torch.empty_like(half)
    t = graph_time(lambda: y.copy_(half))
    print(f"copy (r+w)       {t * 1e3:7.3f} ms  {nbytes / t / 1e12:5.2f} TB/s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bs", type=int, default=160)
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args()
    torch.manual_seed(0)
    bs, layers = args.bs, args.layers
    lens = torch.randint(300, 1800, (bs,)).sort(descending=True).values  # longest first
    pages = (lens + PS - 1) // PS
    total = int(pages.sum())
    indptr = torch.zeros(bs + 1, dtype=torch.int32)
    indptr[1:] = pages.cumsum(0)
    last = (lens - (pages - 1) * PS).int()
    kv_bytes = int(lens.sum()) * KV * D * 2 * 2 * layers
    q = torch.randn(bs, H, D, dtype=torch.bfloat16, device="cuda")
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"bs={bs} ctx mean {int(lens.float().mean())}, {layers} layers, "
          f"KV read {kv_bytes / 1e9:.2f} GB per step")  # fmt: skip

    bandwidth(kv_bytes)

    for layout in ("NHD", "HND"):
        shape = (total + 1, PS, KV, D) if layout == "NHD" else (total + 1, KV, PS, D)
        cache = [
            (torch.randn(shape, dtype=torch.bfloat16, device="cuda"),) * 2 for _ in range(layers)
        ]
        cache = [(k, torch.randn_like(k)) for k, _ in cache]
        for order in ("in order", "shuffled"):
            idx = torch.arange(total, dtype=torch.int32)
            if order == "shuffled":
                idx = idx[torch.randperm(total)]
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, layout, use_tensor_cores=False)
            w.plan(indptr, idx.cuda(), last, H, KV, D, PS, q_data_type=torch.bfloat16)

            def step(w=w, cache=cache) -> None:  # noqa: ANN001
                for kv in cache:
                    w.run(q, kv)

            t = graph_time(step)
            print(f"decode {layout} {order:8s} {t * 1e3:7.3f} ms  {kv_bytes / t / 1e12:5.2f} TB/s")
        del cache


if __name__ == "__main__":
    main()
