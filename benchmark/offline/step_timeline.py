"""Where the standard workload's time goes, step by step, against the memory floor.

    python benchmark/offline/step_timeline.py --config-json CONFIG --dummy-weight \
        [--repeats 3] [engine flags]

A CUDA event is recorded as each step is launched, so the gap between two events is the
device time of a step, idle included. Decode steps are binned by batch size and compared
with their floor: the KV cache read once at the measured copy bandwidth, plus the weights read
once or their GEMM FLOPs at the measured bf16 rate, whichever takes longer (H200 figures from
../shared/notes/performance.md; override with MINISGL_BW / MINISGL_FLOPS).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_params, parse_args, prepare  # noqa: E402

BANDWIDTH = float(os.environ.get("MINISGL_BW", 4.3e12))  # bytes/s, the H200's copy bandwidth
FLOPS = float(os.environ.get("MINISGL_FLOPS", 790e12))  # dense bf16 GEMM FLOP/s on the H200


def main() -> None:
    args = parse_args(sys.argv[1:])
    from minisgl import LLM, SamplingParams

    model, _, prompts, out_lens, kwargs = prepare(args)
    llm = LLM(model, dummy_weight=args.dummy_weight, **kwargs)
    params = make_params(args, out_lens)
    warm = [SamplingParams(temperature=args.temperature, max_tokens=4, ignore_eos=True)]
    llm.generate([prompts[0][:8]], warm, use_tqdm=False)  # the benchmark's tiny warm-up
    engine = llm.scheduler.engine
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_per_token = 2 * engine.pool.k[0, 0].numel() * engine.pool.k.element_size()
    kv_per_token *= engine.cfg.num_layers
    steps: list[tuple[bool, int, int, torch.cuda.Event]] = []
    host: list[float] = []  # when each step was launched
    forward = engine.forward
    gc_times: dict[int, list[float]] = {}  # generation -> pause of each collection
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_times.setdefault(info["generation"], []).append(time.perf_counter() - gc_start[0])

    gc.callbacks.append(on_gc)

    def timed_forward(batch, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        host.append(time.perf_counter())
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        steps.append(
            (batch.is_prefill, batch.size, sum(batch.prefix_lens) + sum(batch.extend_lens), ev)
        )
        return forward(batch, *a, **kw)

    engine.forward = timed_forward
    for run in range(args.repeats):
        steps.clear()
        host.clear()
        gc_times.clear()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
        print(f"== run {run + 1}: {sum(out_lens) / total:,.0f} tok/s; Triton kernels compiled "
              f"so far: {triton_compiled()}; allocator retries (device syncs): {retries}")  # fmt: skip
        gcs = ", ".join(
            f"gen{g} {len(t)}x {1e3 * sum(t):.1f} ms" for g, t in sorted(gc_times.items())
        )
        print(f"host: first step launched {1e3 * (host[0] - t0):.1f} ms after generate(), last "
              f"{1e3 * (t0 + total - host[-1]):.1f} ms before the end; GC pauses: {gcs or 'none'}")  # fmt: skip
        report(steps, weight_bytes, kv_per_token)


def triton_compiled() -> str:
    try:
        from minisgl.kernel import triton_ops

        mod = triton_ops._kernels()
        kernels = [mod.qk_rope_store_kernel, mod.gumbel_argmax_kernel]
        return ", ".join(
            f"{k.fn.__name__} {sum(len(c[0]) for c in k.device_caches.values())}" for k in kernels
        )
    except Exception as e:  # internal API: report, do not fail the run
        return f"unknown ({type(e).__name__})"


def report(steps: list, weight_bytes: int, kv_per_token: int) -> None:
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    end.synchronize()
    events = [s[3] for s in steps] + [end]
    durs = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    print(f"{len(steps)} steps, device span {sum(durs) / 1e3:.2f} s")
    pre = [d for (p, *_), d in zip(steps, durs) if p]
    print(f"prefill: {len(pre)} steps, {sum(pre):.0f} ms")
    bins = [(1, 16), (17, 32), (33, 64), (65, 128), (129, 192), (193, 256), (257, 10**9)]
    print("decode batch | steps | ms total | ms/step | floor ms/step | floor share")
    for lo, hi in bins:
        sel = [(b, ctx, d) for (p, b, ctx, _), d in zip(steps, durs) if not p and lo <= b <= hi]
        if not sel:
            continue
        ms = sum(d for *_, d in sel)
        # each weight element does one multiply-add per row (2 FLOPs per element per row)
        floor = sum((ctx * kv_per_token / BANDWIDTH + max(weight_bytes / BANDWIDTH,
                     2 * b * weight_bytes / 2 / FLOPS)) * 1e3 for b, ctx, _ in sel)  # fmt: skip
        print(f"{lo:4d}-{min(hi, 9999):<6d} | {len(sel):5d} | {ms:8.0f} | {ms / len(sel):7.2f} | "
              f"{floor / len(sel):13.2f} | {100 * floor / ms:5.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
