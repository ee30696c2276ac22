"""Profile the standard workload on the device: torch-profiler kernel table for a window of
decode steps, and a cProfile of the host side of the whole run.

    python benchmark/offline/profile_step.py --config-json CONFIG --dummy-weight \
        [--window 400:420] [--no-cprofile] [engine flags]

The chrome trace goes to $MINISGL_TRACE (default /tmp/minisgl_trace.json, plus a .gz copy).
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import json
import os
import pstats
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_params, parse_args, prepare  # noqa: E402

CATEGORIES = [  # (name, regex on the kernel name), first match wins
    ("attention", r"BatchDecode|BatchPrefill|Attention|flash|fmha"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|cublas|splitK"),
    ("norm", r"[Nn]orm"),
    ("rope", r"[Rr]ope|[Rr]otary"),
    ("silu", r"silu|act_and_mul|Act"),
    ("store_kv", r"store|scatter|index_put"),
    ("sampling", r"[Ss]ampl|argmax|softmax|exponential|topk|sort|[Rr]educe"),
    ("copy", r"[Cc]opy|memcpy|memset|Memcpy|Memset"),
]


def summarize(trace: str) -> None:
    """Device time per kernel category and GPU idle time over the profiled window."""
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        print("no device events in the trace")
        return
    kernels.sort(key=lambda e: e["ts"])
    span = max(e["ts"] + e["dur"] for e in kernels) - kernels[0]["ts"]
    busy, end = 0.0, kernels[0]["ts"]
    for e in kernels:  # union of the intervals: kernels of two streams may overlap
        s, t = max(e["ts"], end), e["ts"] + e["dur"]
        busy += max(0.0, t - s)
        end = max(end, t)
    cats: dict[str, float] = {}
    for e in kernels:
        name = next((c for c, rx in CATEGORIES if re.search(rx, e["name"])), "other")
        cats[name] = cats.get(name, 0.0) + e["dur"]
    print(f"window {span / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms "
          f"({100 * busy / span:.1f} %), {len(kernels)} device events")  # fmt: skip
    for name, us in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10s} {us / 1e3:8.2f} ms  {100 * us / span:5.1f} %")


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--window", default="400:420", help="steps to trace, START:END")
    own.add_argument("--no-cprofile", action="store_true", help="skip the host profile")
    own.add_argument("--warm-full", action="store_true",
                     help="warm up with the whole workload (the profiled run then hits the "
                     "prefix cache like runs 2-3 of bench.py)")  # fmt: skip
    own.add_argument("--host-window", action="store_true",
                     help="cProfile only the window's steps, without the torch profiler")  # fmt: skip
    mine, rest = own.parse_known_args(sys.argv[1:])
    first, last = (int(x) for x in mine.window.split(":"))
    args = parse_args(rest)
    from minisgl import LLM

    model, _, prompts, out_lens, kwargs = prepare(args)
    llm = LLM(model, dummy_weight=args.dummy_weight, **kwargs)
    params = make_params(args, out_lens)
    warm = len(prompts) if mine.warm_full else 32
    llm.generate(prompts[:warm], params[:warm], use_tqdm=False)  # warm-up

    sched = llm.scheduler
    step, n = sched.step, [0]
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    times: list[tuple[bool, float]] = []

    win_cp = cProfile.Profile()

    def traced_step() -> None:
        n[0] += 1
        inside = first <= n[0] <= last
        if n[0] == first and not mine.host_window:
            prof.start()
        if n[0] == 1:
            print(f"first step starts {1e3 * (time.perf_counter() - t0):.1f} ms after generate()")
        t = time.perf_counter()
        if inside and mine.host_window:
            win_cp.enable()
        step()
        win_cp.disable()
        times.append((sched.last_was_prefill, time.perf_counter() - t))
        if n[0] == last and not mine.host_window:
            torch.cuda.synchronize()
            prof.stop()

    sched.step = traced_step
    cp = cProfile.Profile()
    t0 = time.perf_counter()
    if not mine.no_cprofile:
        cp.enable()
    llm.generate(prompts, params, use_tqdm=False)
    cp.disable()
    total = time.perf_counter() - t0
    print(
        f"run: {sum(out_lens)} tokens in {total:.2f} s = {sum(out_lens) / total:,.0f} tok/s, {n[0]} steps"
    )
    print("host time of the first steps (ms):",
          " ".join(f"{'P' if p else 'D'}{1e3 * t:.1f}" for p, t in times[:8]))  # fmt: skip
    pre = [t for p, t in times if p]
    dec = [t for p, t in times if not p]
    print(f"prefill steps {len(pre)}: {sum(pre):.2f} s; decode steps {len(dec)}: {sum(dec):.2f} s "
          f"(mean {1e3 * sum(dec) / max(1, len(dec)):.2f} ms)")  # fmt: skip
    if mine.host_window:
        pstats.Stats(win_cp).sort_stats("cumtime").print_stats(40)
        return
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    trace = os.environ.get("MINISGL_TRACE", "/tmp/minisgl_trace.json")
    prof.export_chrome_trace(trace)
    summarize(trace)
    with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
        g.write(f.read())
    if not mine.no_cprofile:
        st = pstats.Stats(cp).sort_stats("tottime")
        st.print_stats(25)
        st.print_callers("compile")


if __name__ == "__main__":
    main()
