"""Decode-attention variants at the standard workload's shapes (Qwen3-0.6B: 16 q heads, 8 KV
heads, head_dim 128, bf16), to pick page size and kernel: FlashInfer decode with and without
tensor cores, and the (FA3 on Hopper) prefill kernel used for decode.

    python benchmark/micro/attn_micro.py [QUERY_HEADS]   # 16 (0.6B, group 2) or 32 (8B, group 4)
"""

from __future__ import annotations

import sys

import flashinfer
import torch

H, KV, D = int(sys.argv[1]) if len(sys.argv) > 1 else 16, 8, 128


def bench(fn, iters: int = 30) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1e3  # us


def main() -> None:
    torch.manual_seed(0)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    for bs, lo, hi in [(170, 600, 1400), (256, 300, 900), (64, 900, 1100)]:
        lens = torch.randint(lo, hi, (bs,))
        for ps in (64, 256):
            pages = (lens + ps - 1) // ps
            total = int(pages.sum())
            k = torch.randn(total + 1, ps, KV, D, dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
            indptr = torch.zeros(bs + 1, dtype=torch.int32)
            indptr[1:] = pages.cumsum(0)
            indices = torch.randperm(total, dtype=torch.int32, device="cuda")
            last = (lens - (pages - 1) * ps).int()
            q = torch.randn(bs, H, D, dtype=torch.bfloat16, device="cuda")
            gbytes = int(lens.sum()) * KV * D * 2 * 2 / 1e9
            row = (
                f"bs={bs:3d} ctx~{int(lens.float().mean()):4d} ps={ps:3d} KV={gbytes * 1e3:6.1f}MB:"
            )
            for tc, backend in ((False, "auto"), (True, "fa2"), (True, "fa3")):
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    ws, "NHD", use_tensor_cores=tc, backend=backend
                )
                w.plan(indptr, indices, last, H, KV, D, ps, q_data_type=torch.bfloat16)
                us = bench(lambda w=w, q=q, k=k, v=v: w.run(q, (k, v)))
                name = f"decodeTC-{backend}" if tc else "decode"
                row += f"  {name} {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
            for backend in ():  # the prefill kernels used for decode (above, via TC)
                try:
                    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
                    qo = torch.arange(bs + 1, dtype=torch.int32)
                    w.plan(
                        qo,
                        indptr,
                        indices,
                        last,
                        H,
                        KV,
                        D,
                        ps,
                        causal=True,
                        q_data_type=torch.bfloat16,
                    )
                    us = bench(lambda w=w, q=q, k=k, v=v: w.run(q, (k, v)))
                    row += f"  {backend} {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
                except Exception as e:  # noqa: BLE001
                    row += f"  {backend} failed ({type(e).__name__})"
            print(row, flush=True)


if __name__ == "__main__":
    main()
