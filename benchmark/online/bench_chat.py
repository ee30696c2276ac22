"""The standard online workload, against any server with streaming `/v1/chat/completions`
(minisgl's and the reference Mini-SGLang's alike):

    python benchmark/online/bench_chat.py --base-url http://127.0.0.1:30000/v1 --rate 16

256 requests, `random.seed(seed)`: per request `randint(100, 1024)` prompt tokens, each
`randint(0, 10000)`, then one `randint(100, 1024)` output length per request (the offline
workload's draws). The model directory needs a word-level tokenizer whose token i is the word
`t{i}` (benchmark/online/dummy_tokenizer.py, ../shared/peer/make_model_dir.py): a prompt is
those words, and every streamed word is one output token, so the output is verified exactly:
each request must stream exactly `max_tokens` words `t{i}` with i < vocab. A run with any
wrong output prints why and exits with status 3 instead of a figure. `--length-slack N`
accepts streams up to N tokens short and says so in the title: the reference server's streams
end one token before `max_tokens` (docs/benchmarks.md), so its figure is only measurable so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

_spec = importlib.util.spec_from_file_location(
    "minisgl_bench_serving", Path(__file__).with_name("bench_serving.py")
)
bs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bs
_spec.loader.exec_module(bs)
WORD = re.compile(r"t(\d+)")


def workload(n: int, seed: int, lo: int = 100, hi: int = 1024) -> list[tuple[str, int]]:
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(lo, hi))] for _ in range(n)]
    return [(" ".join(f"t{i}" for i in p), random.randint(lo, hi)) for p in prompts]


async def send(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, temp: float
) -> tuple[Any, str]:
    res = bs.Result(input_len=len(prompt.split()), requested=max_tokens)
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temp,
        "ignore_eos": True,
        "stream": True,
    }
    text, t0 = [], time.perf_counter()
    last = res.start = t0
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):
                    raise RuntimeError(str(chunk["error"])[:200])
                choices = chunk.get("choices") or []
                delta = (choices[0].get("delta") or {}).get("content") if choices else None
                if not delta:
                    continue
                now = time.perf_counter()
                if res.chunks == 0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last, res.chunks = now, res.chunks + 1
                text.append(delta)
        res.e2e = time.perf_counter() - t0
        res.ok = True
    except Exception as e:  # noqa: BLE001 - recorded, the run is then reported as failed
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res, "".join(text)


def check(text: str, max_tokens: int, vocab: int, slack: int = 0) -> str:
    """Why this output is wrong, or ''."""
    words = WORD.findall(text)
    if WORD.sub("", text).strip():
        return f"text that is no token of the vocabulary: {WORD.sub('', text).strip()[:40]!r}"
    if any(int(w) >= vocab for w in words):
        return f"ids outside [0, {vocab})"
    if not max_tokens - slack <= len(words) <= max_tokens:
        return f"{len(words)} tokens instead of {max_tokens}"
    return ""


async def run(args: argparse.Namespace) -> tuple[list[Any], list[str], float]:
    reqs = workload(args.num_requests, args.seed)
    rng = random.Random(args.seed + 1)
    arrivals, t = [], 0.0
    for _ in reqs:
        arrivals.append(t)
        t += rng.expovariate(args.rate) if args.rate != float("inf") else 0.0
    url = args.base_url.rstrip("/") + "/chat/completions"
    async with httpx.AsyncClient(
        timeout=args.timeout, limits=httpx.Limits(max_connections=None)
    ) as c:
        start = time.perf_counter()

        async def one(i: int) -> tuple[Any, str]:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            return await send(c, url, args.model, reqs[i][0], reqs[i][1], args.temperature)

        out = await asyncio.gather(*(one(i) for i in range(len(reqs))))
        duration = time.perf_counter() - start
    results, texts = [r for r, _ in out], [x for _, x in out]
    for r, x, (_, n) in zip(results, texts, reqs):
        r.output_tokens = len(WORD.findall(x))
        if r.ok and (why := check(x, n, args.vocab, args.length_slack)):
            r.ok, r.error = False, why
    return results, texts, duration


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--model", default="", help="the served model name (default: GET /models)")
    p.add_argument(
        "--rate", type=float, default=float("inf"), help="Poisson req/s (inf: all at once)"
    )
    p.add_argument("-n", "--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--length-slack", type=int, default=0, help="accept streams this much short")
    p.add_argument("--label", default="")
    p.add_argument("--json", default="", help="write the summary here")
    args = p.parse_args(argv)
    if not args.model:
        try:
            args.model = httpx.get(args.base_url.rstrip("/") + "/models").json()["data"][0]["id"]
        except Exception:  # noqa: BLE001 - a server without /v1/models (the reference)
            args.model = "default"
    results, _, duration = asyncio.run(run(args))
    summary = bs.summarize(results, duration)
    title = args.label or f"chat, rate {args.rate}, T={args.temperature}"
    if args.length_slack:
        short = sum(r.output_tokens < r.requested for r in results)
        title += f" (length slack {args.length_slack}: {short} of {len(results)} streams short)"
    if summary["failed"]:
        print(f"{title}: WRONG OUTPUT or errors in {summary['failed']} requests, no figure:")
        for e in summary["errors"]:
            print(f"  {e}")
        sys.exit(3)
    bs.print_table(summary, title)
    if args.json:
        Path(args.json).write_text(json.dumps(summary | {"argv": argv or sys.argv[1:]}))
    return summary


if __name__ == "__main__":
    main()
