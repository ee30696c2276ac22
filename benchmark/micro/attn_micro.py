"""Decode-attention kernels at the standard workload's shapes (Qwen3-0.6B: 16 q heads, 8 KV
heads, head_dim 128, bf16; 32 q heads for the 8B's group 4), to pick the kernel and page size:
FlashInfer's tensor-core decode through FA2 (page 64/128/256) against TensorRT-LLM's XQA decode
kernel as FlashInfer ships it (`flashinfer.xqa`, page 64/128, a dense page table, no plan).
Every XQA output is checked against FA2's before it is timed.

    python benchmark/micro/attn_micro.py [QUERY_HEADS]   # 16 (0.6B, group 2) or 32 (8B, group 4)
"""

from __future__ import annotations

import sys

import flashinfer
import torch
from flashinfer.jit.core import build_jit_specs
from flashinfer.jit.xqa import gen_xqa_module

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


def paged_batch(lens: torch.Tensor, ps: int, heads: int, pool_pages: int = 0) -> tuple:
    """Random bf16 K/V holding `lens` tokens per request in shuffled pages of `ps` tokens, and one
    query per request: (q, k, v, indptr, indices, last-page lengths, pages, GB of KV read). With
    `pool_pages` above the pages needed, they are a random subset of a pool that large (as in
    the engine, whose pool is mostly not this batch's)."""
    bf = torch.bfloat16
    pages = (lens + ps - 1) // ps
    total = int(pages.sum())
    pool = max(pool_pages, total)
    k = torch.randn(pool + 1, ps, KV, D, dtype=bf, device="cuda")
    v = torch.randn_like(k)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = pages.cumsum(0)
    indices = torch.randperm(pool, dtype=torch.int32, device="cuda")[:total]
    last = (lens - (pages - 1) * ps).int()
    q = torch.randn(len(lens), heads, D, dtype=bf, device="cuda")
    return q, k, v, indptr, indices, last, pages, int(lens.sum()) * KV * D * 2 * 2 / 1e9


def main() -> None:
    torch.manual_seed(0)
    bf = torch.bfloat16
    # compile the XQA variants in one parallel ninja build instead of one after another
    specs = [gen_xqa_module(bf, bf, ps, D, H // KV, False, bf) for ps in (64, 128)]
    build_jit_specs(specs)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    xws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    for bs, lo, hi in [(170, 600, 1400), (256, 300, 900), (64, 900, 1100), (16, 300, 1000)]:
        lens = torch.randint(lo, hi, (bs,))
        for ps in (64, 128, 256):
            q, k, v, indptr, indices, last, pages, gbytes = paged_batch(lens, ps, H)
            row = (
                f"bs={bs:3d} ctx~{int(lens.float().mean()):4d} ps={ps:3d} KV={gbytes * 1e3:6.1f}MB:"
            )
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws, "NHD", use_tensor_cores=True, backend="fa2"
            )
            w.plan(indptr, indices, last, H, KV, D, ps, q_data_type=bf)
            ref = w.run(q, (k, v))
            us = bench(lambda w=w, q=q, k=k, v=v: w.run(q, (k, v)))
            row += f"  FA2-TC {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
            if ps <= 128:
                table = torch.zeros(bs, int(pages.max()), dtype=torch.int32, device="cuda")
                for i in range(bs):
                    table[i, : pages[i]] = indices[indptr[i] : indptr[i + 1]]
                seq = lens.to(torch.uint32).cuda()
                out = torch.empty_like(q)

                def xqa(q=q, k=k, v=v, table=table, seq=seq, out=out, ps=ps) -> torch.Tensor:  # noqa: ANN001
                    return flashinfer.decode.xqa_batch_decode_with_kv_cache(
                        q,
                        (k, v),
                        xws,
                        table,
                        seq,
                        int(table.shape[1]) * ps,
                        bmm1_scale=D**-0.5,
                        out=out,
                    )

                err = (xqa().float() - ref.float()).abs().max().item()
                us = bench(xqa)
                row += f"  XQA {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s (max |XQA-FA2| {err:.1e})"
            print(row, flush=True)


if __name__ == "__main__":
    main()
