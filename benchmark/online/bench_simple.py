"""Quick check: N concurrent requests of identical length against an OpenAI-compatible server.

    python benchmark/online/bench_simple.py --base-url http://127.0.0.1:30000/v1 \
        -n 64 --input-len 512 --output-len 128

Every prompt is distinct random token ids (no shared prefix unless --shared-prefix is given);
all requests are sent at once (or Poisson at --rate). Prints the same summary as bench_serving.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import sys
from pathlib import Path
from typing import Any


def _load_bench_serving() -> Any:
    path = Path(__file__).with_name("bench_serving.py")
    spec = importlib.util.spec_from_file_location("minisgl_bench_bench_serving", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bs = _load_bench_serving()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bs.add_client_args(p)
    p.add_argument("-n", "--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--shared-prefix", type=int, default=0, help="leading tokens common to all prompts"
    )
    p.add_argument(
        "--rate", type=float, default=float("inf"), help="Poisson req/s (inf = all at once)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 <= args.shared_prefix <= args.input_len:
        p.error("need 0 <= --shared-prefix <= --input-len")

    block = bs.trace_mod.BLOCK
    shared = [f"shared:{b}" for b in range(-(-args.shared_prefix // block))]
    prefix = (
        bs.trace_mod.build_prompt(shared, args.shared_prefix, args.vocab_size) if shared else []
    )
    times = bs.trace_mod.poisson_times(args.num_requests, args.rate, args.seed)
    specs = []
    for i in range(args.num_requests):
        rest = args.input_len - len(prefix)
        own = [f"s{args.seed}:r{i}:{b}" for b in range(-(-rest // block))]
        tokens = prefix + (bs.trace_mod.build_prompt(own, rest, args.vocab_size) if rest else [])
        prompt = bs.to_text(tokens) if args.text_prompts else tokens
        specs.append(bs.Spec(prompt, len(tokens), args.output_len, times[i]))

    model = bs.resolve_model(args)
    results, duration = asyncio.run(
        bs.run(args.base_url, model, specs, args.api_key, args.max_concurrency, args.timeout)
    )
    summary = bs.summarize(results, duration)
    print_title = (
        args.label or f"{args.num_requests} x ({args.input_len} in, {args.output_len} out)"
    )
    bs.print_table(summary, print_title)
    config = {
        "label": args.label,
        "n": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "shared_prefix": args.shared_prefix,
        "rate": args.rate,
        "offered_rate": args.rate,
        "max_concurrency": args.max_concurrency,
        "base_url": args.base_url,
        "model": model,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.json:
        bs.dump(args.json, config, summary, results)
    return {"config": config, "summary": summary}


if __name__ == "__main__":
    main()
