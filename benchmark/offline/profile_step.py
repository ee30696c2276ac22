"""Profile the standard workload on the device: torch-profiler kernel table for a window of
decode steps, and a cProfile of the host side of the whole run.

    python benchmark/offline/profile_step.py --config-json CONFIG --dummy-weight [engine flags]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_params, parse_args, prepare  # noqa: E402


def main() -> None:
    args = parse_args(sys.argv[1:])
    from minisgl import LLM

    model, _, prompts, out_lens, kwargs = prepare(args)
    llm = LLM(model, dummy_weight=args.dummy_weight, **kwargs)
    params = make_params(args, out_lens)
    llm.generate(prompts[:32], params[:32], use_tqdm=False)  # warm-up

    sched = llm.scheduler
    step, n = sched.step, [0]
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    times: list[tuple[bool, float]] = []

    def traced_step() -> None:
        n[0] += 1
        if n[0] == 400:
            prof.start()
        t = time.perf_counter()
        step()
        times.append((sched.last_was_prefill, time.perf_counter() - t))
        if n[0] == 420:
            torch.cuda.synchronize()
            prof.stop()

    sched.step = traced_step
    cp = cProfile.Profile()
    t0 = time.perf_counter()
    cp.enable()
    llm.generate(prompts, params, use_tqdm=False)
    cp.disable()
    total = time.perf_counter() - t0
    print(
        f"run: {sum(out_lens)} tokens in {total:.2f} s = {sum(out_lens) / total:,.0f} tok/s, {n[0]} steps"
    )
    pre = [t for p, t in times if p]
    dec = [t for p, t in times if not p]
    print(f"prefill steps {len(pre)}: {sum(pre):.2f} s; decode steps {len(dec)}: {sum(dec):.2f} s "
          f"(mean {1e3 * sum(dec) / max(1, len(dec)):.2f} ms)")  # fmt: skip
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    st = pstats.Stats(cp).sort_stats("tottime")
    st.print_stats(25)
    st.print_callers("compile")


if __name__ == "__main__":
    main()
