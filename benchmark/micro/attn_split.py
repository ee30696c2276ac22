"""Decode attention at the standard workload's real batches: which requests are alive at decode
step s and their context lengths, Qwen3-0.6B heads (16 q / 8 KV / 128), bf16, page 64. Compares
FlashInfer's CUDA-core decode kernel with the batch in admission order, sorted by context
length (longest first), and each request's pages split in C chunks run as separate rows and
merged by their log-sum-exp (balances the work per thread block).

    python benchmark/micro/attn_split.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import flashinfer
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "offline"))
sys.path.insert(0, str(Path(__file__).parent))
from attn_micro import bench  # noqa: E402
from bench import make_workload  # noqa: E402

H, KV, D, PS = 16, 8, 128, 64


def paged(lens: list[int], chunks: int) -> tuple:
    """indptr, last-page lengths and q-row map for each request's pages cut in `chunks` runs."""
    indptr, last, rows, start = [0], [], [], 0
    for i, n in enumerate(lens):
        pages = -(-n // PS)
        c = min(chunks, pages)
        cuts = [start + pages * j // c for j in range(c + 1)]
        for a, b in zip(cuts, cuts[1:]):
            indptr.append(indptr[-1] + b - a)
            last.append(n - (pages - 1) * PS if b == start + pages else PS)
            rows.append(i)
        start += pages
    return torch.tensor(indptr, dtype=torch.int32), torch.tensor(last, dtype=torch.int32), rows


def run(w, q, k, v, qi, bs: int, chunks: int, same: bool) -> torch.Tensor:  # noqa: ANN001
    if chunks == 1:
        return w.run(q, (k, v))
    o, s = w.run(q[qi], (k, v), return_lse=True)
    if same:  # every request has `chunks` rows: merge them (else time the kernel alone)
        return flashinfer.merge_states(o.view(bs, chunks, H, D), s.view(bs, chunks, H))[0]
    return o


def main() -> None:
    torch.manual_seed(0)
    prompts, outs = make_workload(256, 100, 1024, 100, 1024, 0, 10000)
    ins = [len(p) for p in prompts]
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    for step in (50, 250, 400, 600, 800):
        lens = [i + step for i, o in zip(ins, outs) if o > step]
        bs = len(lens)
        total = sum(-(-n // PS) for n in lens)
        k = torch.randn(total + 1, PS, KV, D, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        indices = torch.arange(total, dtype=torch.int32, device="cuda")
        q = torch.randn(bs, H, D, dtype=torch.bfloat16, device="cuda")
        gb = sum(lens) * KV * D * 4 / 1e9
        row = f"step {step:4d} bs={bs:3d} ctx~{sum(lens) // bs:4d} KV/layer={gb * 1e3:5.0f}MB:"
        for name, order in (("admission", lens), ("sorted", sorted(lens, reverse=True))):
            for chunks in (1, 2, 4):
                indptr, last, rows = paged(order, chunks)
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
                w.plan(indptr, indices, last, H, KV, D, PS, q_data_type=torch.bfloat16)
                qi = torch.tensor(rows, device="cuda")
                same = all(rows.count(i) == chunks for i in range(bs))
                us = bench(lambda a=(w, q, k, v, qi, bs, chunks, same): run(*a))
                row += f"  {name}/{chunks} {us:5.1f}us {gb / us * 1e3:4.2f}TB/s"
        print(row, flush=True)


if __name__ == "__main__":
    main()
