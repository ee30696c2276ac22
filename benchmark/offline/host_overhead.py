"""Host-side cost of one scheduler step, without a device: the standard workload's shapes
(256 requests, lengths in [100, 1024], page size 64) run through the real Scheduler and the
engine's metadata packing, with the model forward replaced by a random-token stub. What it
measures is the CPU work that overlap scheduling has to hide behind each GPU step (~6-10 ms
on the H100 at this workload), so it can be optimised on a machine without a GPU.

    python benchmark/offline/host_overhead.py [--num-reqs 256] [--page-size 64]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from minisgl import LLM, SamplingParams
from minisgl.engine.engine import StepOutput

# a 1-layer model with Qwen3-0.6B's vocabulary and context: the stub never runs it
CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=64,
    intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=True, torch_dtype="float32",
)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-reqs", type=int, default=256)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    d = tempfile.mkdtemp()
    Path(d, "config.json").write_text(json.dumps(CONFIG))
    llm = LLM(d, device="cpu", dummy_weight=True, page_size=args.page_size, num_pages=600_000 // args.page_size,
              max_running_requests=args.num_reqs, max_seq_len=2048)  # fmt: skip
    eng = llm.engine
    gen = torch.Generator().manual_seed(0)
    times = {True: [], False: []}

    def stub_forward(batch):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        meta, _ = eng._meta(batch)  # the real per-step host metadata work
        picked = [r for r, s in zip(batch.reqs, batch.sample_mask) if s]
        eng._sampling_info(picked, batch.sample_positions)
        tokens = torch.randint(0, 10000, (len(picked),), generator=gen) if picked else None
        times[batch.is_prefill].append(time.perf_counter() - t0)
        return StepOutput(batch, tokens, None, None)

    eng.forward = stub_forward
    random.seed(args.seed)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
        for _ in range(args.num_reqs)
    ]
    params = [
        SamplingParams(temperature=0.6, max_tokens=random.randint(100, 1024), ignore_eos=True)
        for _ in prompts
    ]
    sched_step = llm.scheduler.step
    step_times: list[float] = []

    def timed_step() -> None:
        t0 = time.perf_counter()
        sched_step()
        step_times.append(time.perf_counter() - t0)

    llm.scheduler.step = timed_step
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - t0
    dec, pre = times[False], times[True]
    print(
        f"{len(step_times)} steps in {total:.2f} s: {1e3 * total / len(step_times):.2f} ms per step (host only)"
    )
    print(f"  engine metadata + sampling tensors: decode {1e3 * sum(dec) / max(1, len(dec)):.3f} ms/step, "
          f"prefill {1e3 * sum(pre) / max(1, len(pre)):.3f} ms/step")  # fmt: skip
    print(
        f"  scheduler + result processing: {1e3 * (sum(step_times) - sum(dec) - sum(pre)) / len(step_times):.3f} ms/step"
    )


if __name__ == "__main__":
    main()
