"""FlashInfer's tensor-core decode as the engine runs it (a CUDA-graph wrapper, captured in a
graph) with its default plan against `disable_split_kv=True`, against the eager plan that
`attn_micro.py` times, and in the HND layout (each KV head's rows of a page contiguous). In graph mode the FA2 plan always takes the split-KV path (its grid is
sized for 2 CTAs per SM) and adds a merge kernel; with 8 KV heads a batch of 64+ requests
already gives 512+ CTAs, so one CTA per (request, KV head) may be the faster plan there.
Every variant's output is checked against the eager plan's before it is timed.

    python benchmark/micro/attn_graph.py [QUERY_HEADS]   # 16 (0.6B, group 2) or 32 (8B, group 4)
"""

from __future__ import annotations

import sys
from pathlib import Path

import flashinfer
import torch

sys.path.insert(0, str(Path(__file__).parent))
from attn_micro import paged_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "offline"))
from bench import make_workload  # noqa: E402

H, KV, D, PS = int(sys.argv[1]) if len(sys.argv) > 1 else 16, 8, 128, 64
REPS = 10  # runs per captured graph, so the graph's own launch is amortised


def time_graph(fn) -> float:  # noqa: ANN001
    """us per call of `fn`, captured REPS times in one CUDA graph, median of 20 replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1e3 / REPS


def main() -> None:
    torch.manual_seed(0)
    bf = torch.bfloat16
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    # the engine's batch at decode step 45 of the standard workload (its prompts + 45 tokens,
    # longest first as the scheduler orders them), in a compact pool and in ones 3x and 6x its size (the 8B engine's is ~5x):
    # session 9 measured the engine's kernel at 3.53 TB/s there, this file's rows at 3.8-4.1
    prompts, _ = make_workload(256, 100, 1024, 100, 1024, 0, 10000)
    step45 = torch.tensor(sorted((len(p) + 45 for p in prompts), reverse=True))

    def cases():  # noqa: ANN202  (lengths, pool size / pages needed); random ones drawn in turn
        for bs, lo, hi in [(256, 300, 900), (256, 600, 1400), (170, 600, 1400), (128, 600, 1400),
                           (64, 900, 1100), (32, 300, 1000), (16, 300, 1000)]:  # fmt: skip
            yield torch.randint(lo, hi, (bs,)), 1
        yield step45, 1
        yield step45, 3
        yield step45, 6

    for lens, pool_factor in cases():
        bs = len(lens)
        pool = pool_factor * int(((lens + PS - 1) // PS).sum())
        q, k, v, indptr, indices, last, pages, gbytes = paged_batch(lens, PS, H, pool)
        total = int(pages.sum())
        row = f"H={H} bs={bs:3d} ctx~{int(lens.float().mean()):4d} pool x{pool_factor} KV={gbytes * 1e3:6.1f}MB:"
        eager = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", use_tensor_cores=True, backend="fa2"
        )
        eager.plan(indptr, indices, last, H, KV, D, PS, q_data_type=bf)
        ref = eager.run(q, (k, v))
        us = time_graph(lambda w=eager, q=q, kv=(k, v): w.run(q, kv))
        row += f"  eager-plan {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
        kh, vh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        # HND: each KV head's page rows contiguous, 16 KB runs instead of NHD's 256 B ones
        for name, layout, kv, no_split in [("graph-split", "NHD", (k, v), False),
                                           ("graph-nosplit", "NHD", (k, v), True),
                                           ("graph-HND", "HND", (kh, vh), False)]:  # fmt: skip
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws, layout, use_cuda_graph=True, use_tensor_cores=True, backend="fa2",
                paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device="cuda"),
                paged_kv_indices_buffer=torch.zeros(total, dtype=torch.int32, device="cuda"),
                paged_kv_last_page_len_buffer=torch.zeros(bs, dtype=torch.int32, device="cuda"),
            )  # fmt: skip
            w.plan(indptr, indices, last, H, KV, D, PS, q_data_type=bf, disable_split_kv=no_split)
            err = (w.run(q, kv).float() - ref.float()).abs().max().item()
            assert err < 2e-2, err
            us = time_graph(lambda w=w, q=q, kv=kv: w.run(q, kv))
            row += f"  {name} {us:6.1f}us {gbytes / us * 1e3:4.2f}TB/s"
        del k, v, kh, vh
        print(row, flush=True)


if __name__ == "__main__":
    main()
