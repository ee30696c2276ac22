"""Decode attention at the engine's real batches, and the order its thread blocks run in.

FlashInfer's FA2 grid is (request, 1, KV head) with the request index fastest, so all of KV
head 0's blocks start before head 1's: with the standard workload's spread of context lengths
(145-1,069 tokens at decode step 45) the longest sequences of the last heads start late and
run alone at the end. With the pool in the HND layout ([page, head, token, dim]) every
(page, head) is itself a one-head page, so each (request, KV head) can be planned as its own
one-head request, in any order: request-major gives a global longest-first schedule.

Rows: the alive requests at decode steps 45 / 300 / 600 of the standard workload (prompts +
step, longest first, as the scheduler orders them), bf16, page 64, 8 KV heads, the eager plan
(which the engine's large graph buckets replay). Columns: NHD as the engine runs it; HND, same
plan; HND as one-head requests head-major (the same order as NHD's grid) and request-major.
Every variant's output is checked against the first before it is timed.

    python benchmark/micro/attn_order.py        # query heads 16 (0.6B) and 32 (8B)
"""

from __future__ import annotations

import sys
from pathlib import Path

import flashinfer
import torch

sys.path.insert(0, str(Path(__file__).parent))
from attn_graph import time_graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "offline"))
from bench import make_workload  # noqa: E402

KV, D, PS = 8, 128, 64


def one_head_requests(
    indptr: torch.Tensor, indices: torch.Tensor, last: torch.Tensor, head_major: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indptr, page ids, last lengths, order) of every (request, KV head) as a one-head request
    over the HND pool viewed as [pages * KV, 1, PS, D]; `order` maps them to (request, head)."""
    bs = len(last)
    req = torch.arange(bs).repeat(KV) if head_major else torch.arange(bs).repeat_interleave(KV)
    head = torch.arange(KV).repeat_interleave(bs) if head_major else torch.arange(KV).repeat(bs)
    counts = (indptr[1:] - indptr[:-1])[req]
    new_indptr = torch.zeros(len(req) + 1, dtype=torch.int32)
    new_indptr[1:] = counts.cumsum(0)
    host = indices.cpu().long()
    pages = torch.cat([host[indptr[r] : indptr[r + 1]] * KV + h for r, h in zip(req, head)])
    return new_indptr, pages.int().cuda(), last[req].contiguous(), req * KV + head


def main() -> None:
    torch.manual_seed(0)
    bf = torch.bfloat16
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    prompts, out_lens = make_workload(256, 100, 1024, 100, 1024, 0, 10000)
    for heads in (16, 32):
        group = heads // KV
        for step in (45, 300, 600):
            alive = [len(p) + step for p, n in zip(prompts, out_lens) if n > step]
            lens = torch.tensor(sorted(alive, reverse=True))
            bs = len(lens)
            pages = (lens + PS - 1) // PS
            total = int(pages.sum())
            k = torch.randn(3 * total, PS, KV, D, dtype=bf, device="cuda")
            v = torch.randn_like(k)
            indptr = torch.zeros(bs + 1, dtype=torch.int32)
            indptr[1:] = pages.cumsum(0)
            indices = torch.randperm(3 * total, dtype=torch.int32, device="cuda")[:total]
            last = (lens - (pages - 1) * PS).int()
            q = torch.randn(bs, heads, D, dtype=bf, device="cuda")
            gbytes = int(lens.sum()) * KV * D * 2 * 2 / 1e9
            row = f"H={heads} step {step:3d} bs={bs:3d} ctx {int(lens.min())}-{int(lens.max())}:"

            def timed(layout: str, kv: tuple, qq: torch.Tensor, plan: tuple, n_kv: int) -> tuple:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    ws, layout, use_tensor_cores=True, backend="fa2"
                )
                w.plan(*plan, qq.shape[1], n_kv, D, PS, q_data_type=bf)
                out = w.run(qq, kv)
                return out, time_graph(lambda: w.run(qq, kv))

            ref, us = timed("NHD", (k, v), q, (indptr, indices, last), KV)
            row += f"  NHD {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
            kh, vh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            out, us = timed("HND", (kh, vh), q, (indptr, indices, last), KV)
            assert (out.float() - ref.float()).abs().max().item() < 2e-2
            row += f"  HND {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
            k1, v1 = kh.view(-1, 1, PS, D), vh.view(-1, 1, PS, D)
            for head_major in (True, False):
                ip, ix, la, order = one_head_requests(indptr, indices, last, head_major)
                # query rows of (request r, KV head h): q[r, h * group : (h + 1) * group]
                q1 = q.view(bs * KV, group, D)[order.cuda()]
                out, us = timed("HND", (k1, v1), q1, (ip, ix, la), 1)
                back = torch.empty_like(out)
                back[order.cuda()] = out
                assert (back.view(bs, heads, D).float() - ref.float()).abs().max().item() < 2e-2
                name = "1-head head-major" if head_major else "1-head request-major"
                row += f"  {name} {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
            print(row, flush=True)
            del k, v, kh, vh, k1, v1


if __name__ == "__main__":
    main()
