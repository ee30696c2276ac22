"""Replay a request trace against any OpenAI-compatible server and report latency/throughput.

    python benchmark/online/trace.py generate -o /tmp/trace.jsonl -n 1000 --rate 8
    python benchmark/online/bench_serving.py --base-url http://127.0.0.1:30000/v1 \
        --trace /tmp/trace.jsonl --json /tmp/result.json --label radix

Each request goes to `/v1/completions` with `prompt` = a list of token ids built from the trace's
`hash_ids` (equal ids give equal 16-token blocks, so shared prefixes are real), `max_tokens` =
`output_length`, `ignore_eos`, streaming with usage. The same client measures any server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx


def _load_sibling(name: str) -> Any:
    """Import benchmark/online/<name>.py without shadowing stdlib modules (`trace`)."""
    spec = importlib.util.spec_from_file_location(
        f"minisgl_bench_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


trace_mod = _load_sibling("trace")

WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this".split()
)


@dataclass
class Spec:
    """One request to send: the prompt (token ids or text), its length, and the output length."""

    prompt: list[int] | str
    input_len: int
    output_len: int
    arrival: float = 0.0  # seconds after the benchmark start


@dataclass
class Result:
    ok: bool = False
    input_len: int = 0
    requested: int = 0
    output_tokens: int = 0
    chunks: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    start: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default); NaN for an empty list."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def to_text(tokens: list[int]) -> str:
    """A word per token id, for servers that only accept text prompts (prefixes stay shared)."""
    return " ".join(WORDS[t % len(WORDS)] for t in tokens)


def trace_specs(
    trace: list[dict[str, Any]],
    vocab: int,
    text: bool = False,
    max_input: int = 0,
    max_output: int = 0,
) -> list[Spec]:
    """Build prompts for the trace's requests (optionally clipping lengths for small models)."""
    specs = []
    for i, r in enumerate(trace):
        n_in = min(int(r["input_length"]), max_input) if max_input else int(r["input_length"])
        n_out = min(int(r["output_length"]), max_output) if max_output else int(r["output_length"])
        ids = r.get("hash_ids") or [f"req{i}:{b}" for b in range(math.ceil(n_in / trace_mod.BLOCK))]
        tokens = trace_mod.build_prompt(ids, max(n_in, 1), vocab)
        specs.append(
            Spec(
                to_text(tokens) if text else tokens,
                len(tokens),
                max(n_out, 1),
                float(r["timestamp"]),
            )
        )
    return specs


async def send(
    client: httpx.AsyncClient, url: str, model: str, spec: Spec, headers: dict[str, str]
) -> Result:
    res = Result(input_len=spec.input_len, requested=spec.output_len)
    payload = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = res.start = time.perf_counter()
    last = t0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(str(chunk["error"])[:200])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                choices = chunk.get("choices") or []
                if not choices or (not choices[0].get("text") and choices[0].get("finish_reason")):
                    continue  # usage-only or empty final chunk: not a token
                now = time.perf_counter()
                if res.chunks == 0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
                res.chunks += 1
        res.e2e = time.perf_counter() - t0
        res.output_tokens = usage_tokens if usage_tokens is not None else res.chunks
        res.ok = res.chunks > 0 or res.output_tokens == 0
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 - every failure is recorded, not raised
        res.error = f"{type(e).__name__}: {e}"[:300]
        res.e2e = time.perf_counter() - t0
    return res


async def run(
    base_url: str,
    model: str,
    specs: list[Spec],
    api_key: str = "",
    max_concurrency: int = 0,
    timeout: float = 3600.0,
) -> tuple[list[Result], float]:
    """Send every spec at its arrival time; return the results (in spec order) and the duration."""
    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(spec: Spec) -> Result:
            await asyncio.sleep(max(0.0, start + spec.arrival - time.perf_counter()))
            if sem is None:
                return await send(client, url, model, spec, headers)
            async with sem:
                return await send(client, url, model, spec, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(s) for s in specs))
        duration = time.perf_counter() - start
        for r in results:
            r.start -= start  # send time relative to the benchmark start
        return list(results), duration


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    s: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else math.nan,
        "output_throughput": out_tokens / duration if duration else math.nan,
        "input_throughput": sum(r.input_len for r in ok) / duration if duration else math.nan,
        "total_input_tokens": sum(r.input_len for r in ok),
        "total_output_tokens": out_tokens,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "itl": [g for r in ok for g in r.itl],
        "e2e": [r.e2e for r in ok],
    }
    for name, vals in series.items():
        s[f"mean_{name}_ms"] = 1000 * sum(vals) / len(vals) if vals else math.nan
        for q in (50, 90, 99):
            s[f"p{q}_{name}_ms"] = 1000 * percentile(vals, q)
    errors = [r.error for r in results if not r.ok]
    s["errors"] = sorted(set(errors))[:5]
    return s


def print_table(s: dict[str, Any], title: str = "Serving benchmark") -> None:
    print(f"{'=' * 18} {title} {'=' * 18}")
    rows = [
        ("Completed / failed requests", f"{s['completed']} / {s['failed']}"),
        ("Duration (s)", f"{s['duration_s']:.2f}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output throughput (tok/s)", f"{s['output_throughput']:.1f}"),
        ("Input throughput (tok/s)", f"{s['input_throughput']:.1f}"),
    ]
    for name, label in (("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E")):
        vals = " / ".join(f"{s[f'{k}_{name}_ms']:.1f}" for k in ("mean", "p50", "p90", "p99"))
        rows.append((f"{label} mean/p50/p90/p99 (ms)", vals))
    for k, v in rows:
        print(f"{k:<34}{v:>24}")
    for e in s["errors"]:
        print(f"error: {e}")


def dump(path: str, config: dict[str, Any], summary: dict[str, Any], results: list[Result]) -> None:
    reqs = [
        {k: v for k, v in asdict(r).items() if k != "itl"} | {"itl_count": len(r.itl)}
        for r in results
    ]
    with open(path, "w") as f:
        json.dump({"config": config, "summary": summary, "requests": reqs}, f, indent=1)


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--model", default="", help="model name (default: first of GET /models)")
    p.add_argument("--api-key", default="")
    p.add_argument(
        "--max-concurrency", type=int, default=0, help="requests in flight at most (0 = no cap)"
    )
    p.add_argument("--vocab-size", type=int, default=10000, help="prompt token ids are < this")
    p.add_argument("--text-prompts", action="store_true", help="send words instead of token ids")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, s")
    p.add_argument("--json", default="", help="write config, summary and per-request results here")
    p.add_argument("--label", default="", help="a name for this run (plot legends)")


def resolve_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    r = httpx.get(args.base_url.rstrip("/") + "/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_client_args(p)
    p.add_argument("--trace", required=True, help="JSONL trace (see trace.py)")
    p.add_argument("-n", "--num-requests", type=int, default=None, help="first N requests")
    p.add_argument("--scale", type=float, default=1.0, help="multiply trace arrival times")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="resample Poisson arrivals (req/s; inf = all at once)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --rate arrivals")
    p.add_argument("--max-input-len", type=int, default=0, help="clip input lengths (0 = no)")
    p.add_argument("--max-output-len", type=int, default=0, help="clip output lengths (0 = no)")
    args = p.parse_args(argv)

    trace = trace_mod.load(args.trace, args.num_requests, args.scale)
    specs = trace_specs(
        trace, args.vocab_size, args.text_prompts, args.max_input_len, args.max_output_len
    )
    if args.rate is not None:
        for s, t in zip(specs, trace_mod.poisson_times(len(specs), args.rate, args.seed)):
            s.arrival = t
    model = resolve_model(args)
    results, duration = asyncio.run(
        run(args.base_url, model, specs, args.api_key, args.max_concurrency, args.timeout)
    )
    summary = summarize(results, duration)
    print_table(summary, args.label or "Serving benchmark")
    last = max((s.arrival for s in specs), default=0.0)
    config = {
        "label": args.label,
        "trace": args.trace,
        "n": len(specs),
        "rate": args.rate,
        "scale": args.scale,
        "offered_rate": args.rate
        if args.rate is not None
        else (len(specs) / last if last else math.inf),
        "max_concurrency": args.max_concurrency,
        "base_url": args.base_url,
        "model": model,
        "text_prompts": args.text_prompts,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.json:
        dump(args.json, config, summary, results)
    return {"config": config, "summary": summary}


if __name__ == "__main__":
    main()
