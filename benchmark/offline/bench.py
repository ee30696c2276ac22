"""The standard offline throughput workload, through `minisgl.LLM`.

Standard run (Qwen3-0.6B shape, dummy weights, 256 requests, 133,966 output tokens):

    python benchmark/offline/bench.py --config-json ../shared/configs/qwen3-0.6b.json \
        --dummy-weight --repeats 3

Workload: `random.seed(seed)`; for each request `randint(min_in, max_in)` input tokens, each
`randint(0, max_token_id)` (all inputs first); then one `randint(min_out, max_out)` output length
per request. Sampling: temperature 0.6, `ignore_eos`. Every run generates the same batch.

Every run's output is verified (each request exactly its length, every id in [0, vocab)); a
run that fails prints why and the script exits with status 3 instead of printing a figure.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Engine options forwarded to `LLM(...)` when given: flag name -> type.
ENGINE_FLAGS: dict[str, type] = {
    "device": str,
    "dtype": str,
    "attn": str,
    "page_size": int,
    "cuda_graph_max_bs": int,
    "max_running_requests": int,
    "memory_ratio": float,
    "num_pages": int,
    "max_prefill_length": int,
    "cache": str,
    "tp": int,
    "max_seq_len": int,
}

STANDARD_OUTPUT_TOKENS = 133_966  # default workload (256 reqs, [100, 1024], seed 0)


def make_workload(
    num_reqs: int,
    min_in: int,
    max_in: int,
    min_out: int,
    max_out: int,
    seed: int,
    max_token_id: int,
) -> tuple[list[list[int]], list[int]]:
    """The prompts (token ids) and output lengths, drawn in the standard order."""
    random.seed(seed)
    prompts: list[list[int]] = []
    for _ in range(num_reqs):
        n = random.randint(min_in, max_in)
        prompts.append([random.randint(0, max_token_id) for _ in range(n)])
    out_lens = [random.randint(min_out, max_out) for _ in range(num_reqs)]
    return prompts, out_lens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="", help="model directory (or HF id)")
    p.add_argument("--config-json", default="", help="config.json to copy into a temp model dir")
    p.add_argument("--dummy-weight", action="store_true", help="random weights (config only)")
    p.add_argument("--num-reqs", type=int, default=256)
    p.add_argument("--min-in", type=int, default=100)
    p.add_argument("--max-in", type=int, default=1024)
    p.add_argument("--min-out", type=int, default=100)
    p.add_argument("--max-out", type=int, default=1024)
    p.add_argument(
        "--max-token-id",
        "--vocab-limit",
        dest="max_token_id",
        type=int,
        default=10000,
        help="input token ids are drawn from [0, this] (default 10000)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a tiny warm-up request first (default on)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    for name, typ in ENGINE_FLAGS.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=typ,
            default=None,
            help="engine option (default: the engine's)",
        )
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.config_json):
        p.error("give exactly one of --model and --config-json")
    if args.repeats < 1 or args.num_reqs < 1:
        p.error("--repeats and --num-reqs must be >= 1")
    if not (1 <= args.min_in <= args.max_in and 1 <= args.min_out <= args.max_out):
        p.error("need 1 <= min <= max for input and output lengths")
    return args


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class WrongOutput(RuntimeError):
    """The engine's output failed verification: no throughput figure is printed."""


def verify(outs: list[dict[str, Any]], out_lens: list[int], vocab: int) -> None:
    """Every request its exact length, every id in [0, vocab); raises WrongOutput."""
    if len(outs) != len(out_lens):
        raise WrongOutput(f"expected {len(out_lens)} outputs, got {len(outs)}")
    wrong = [(i, len(o["token_ids"]), w) for i, (o, w) in enumerate(zip(outs, out_lens))
             if len(o["token_ids"]) != w]  # fmt: skip
    ids = [t for o in outs for t in o["token_ids"]]
    bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
    if wrong or bad:
        raise WrongOutput(
            f"{len(wrong)} outputs of the wrong length (index, got, want) {wrong[:3]}; "
            f"{len(bad)} of {len(ids)} ids outside [0, {vocab}) {[hex(t) for t in bad[:3]]}"
        )


def run_once(
    llm: Any, prompts: list[list[int]], params: list[Any], out_lens: list[int], vocab: int
) -> tuple[int, float]:
    """Generate the whole batch and verify it; return (output tokens, seconds)."""
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    except RuntimeError as e:  # the engine itself refused a corrupted step
        raise WrongOutput(str(e)) from e
    seconds = time.perf_counter() - t0
    verify(outs, out_lens, vocab)
    return sum(len(o["token_ids"]) for o in outs), seconds


def vocab_size(llm: Any, model: str) -> int:
    engine = getattr(llm, "engine", None)
    if engine is not None:
        return engine.cfg.vocab_size
    from minisgl.models import ModelConfig
    from minisgl.models.weights import resolve_model_path

    return ModelConfig.from_dir(resolve_model_path(model)).vocab_size


def prepare(
    args: argparse.Namespace,
) -> tuple[str, str | None, list[list[int]], list[int], dict[str, Any]]:
    """(model dir, temp dir to remove or None, prompts, output lengths, LLM options)."""
    model, tmpdir = args.model, None
    if args.config_json:
        tmpdir = tempfile.mkdtemp(prefix="minisgl-bench-")
        shutil.copy(args.config_json, Path(tmpdir) / "config.json")
        model = tmpdir
    prompts, out_lens = make_workload(
        args.num_reqs, args.min_in, args.max_in, args.min_out, args.max_out, args.seed,
        args.max_token_id,
    )  # fmt: skip
    kwargs = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    return model, tmpdir, prompts, out_lens, kwargs


def make_params(args: argparse.Namespace, out_lens: list[int]) -> list[Any]:
    from minisgl import SamplingParams

    return [
        SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True)
        for n in out_lens
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    from minisgl import LLM, SamplingParams

    model, tmpdir, prompts, out_lens, kwargs = prepare(args)
    total_out = sum(out_lens)
    default_shape = (args.num_reqs, args.min_in, args.max_in, args.min_out, args.max_out, args.seed)
    if default_shape == (256, 100, 1024, 100, 1024, 0) and args.max_token_id == 10000:
        assert total_out == STANDARD_OUTPUT_TOKENS, total_out
    print(
        f"workload: {args.num_reqs} requests, {sum(map(len, prompts))} input tokens, "
        f"{total_out} output tokens",
        file=sys.stderr,
    )

    t0 = time.perf_counter()
    llm = LLM(model, dummy_weight=args.dummy_weight, **kwargs)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s ({kwargs})", file=sys.stderr)

    params = make_params(args, out_lens)
    if args.warmup:
        llm.generate(
            [prompts[0][:8]],
            [SamplingParams(temperature=args.temperature, max_tokens=4, ignore_eos=True)],
            use_tqdm=False,
        )

    vocab = vocab_size(llm, model)
    runs: list[dict[str, float]] = []
    for i in range(args.repeats):
        try:
            tokens, seconds = run_once(llm, prompts, params, out_lens, vocab)
        except WrongOutput as e:
            print(f"run {i + 1}/{args.repeats}: WRONG OUTPUT, no figure: {e}", flush=True)
            sys.exit(3)
        runs.append({"output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds})
        print(
            f"run {i + 1}/{args.repeats}: {tokens} output tokens in {seconds:.2f} s "
            f"-> {tokens / seconds:,.1f} tok/s",
            flush=True,
        )
    median = statistics.median(r["tok_s"] for r in runs)
    print(f"median: {median:,.1f} tok/s over {args.repeats} runs", flush=True)

    result = {
        "runs": runs,
        "median_tok_s": median,
        "total_output_tokens": total_out,
        "total_input_tokens": sum(map(len, prompts)),
        "device": device_name(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "engine_kwargs": kwargs,
    }
    if args.json:
        print(json.dumps(result))
    shutdown = getattr(llm, "shutdown", None)
    if callable(shutdown):
        shutdown()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
