"""Request traces in the JSONL format of the public Qwen Bailian serving trace.

One JSON object per line (`qwen_traceA_blksz_16.jsonl` from alibaba-edu/qwen-bailian-usagetraces-anon):
`chat_id`, `parent_chat_id` (-1 for a first turn), `timestamp` (seconds), `input_length`,
`output_length`, `type` (text/search/image/file), `turn` (1-based) and `hash_ids` (one id per
16-token block of the input; equal ids mean equal blocks, so prefixes are shared).

    python benchmark/online/trace.py generate -o trace.jsonl -n 1000 --rate 8
    python benchmark/online/trace.py download -o qwen_traceA_blksz_16.jsonl
    python benchmark/online/trace.py --download            # same, default output name
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import urllib.request
from pathlib import Path
from typing import Any

BLOCK = 16
TRACE_NAME = "qwen_traceA_blksz_16.jsonl"
REPO = "alibaba-edu/qwen-bailian-usagetraces-anon"
DOWNLOAD_URLS = [
    f"https://huggingface.co/datasets/{REPO}/resolve/main/{TRACE_NAME}",
    f"https://media.githubusercontent.com/media/{REPO}/main/{TRACE_NAME}",
    f"https://raw.githubusercontent.com/{REPO}/main/{TRACE_NAME}",
]

Request = dict[str, Any]


def sample_length(
    rng: random.Random, dist: str, mean: float, sigma: float, lo: int, hi: int
) -> int:
    """A length from a lognormal with the given mean (or uniform in [lo, hi]), clipped to [lo, hi]."""
    if dist == "uniform":
        return rng.randint(lo, hi)
    if dist != "lognormal":
        raise ValueError(f"unknown length distribution {dist!r}")
    mu = math.log(mean) - sigma * sigma / 2  # so that E[x] = mean
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def generate(
    n: int,
    rate: float,
    seed: int = 0,
    input_dist: str = "lognormal",
    input_mean: float = 512,
    input_sigma: float = 1.0,
    min_input: int = 16,
    max_input: int = 4096,
    output_dist: str = "lognormal",
    output_mean: float = 128,
    output_sigma: float = 0.8,
    min_output: int = 1,
    max_output: int = 1024,
    followup_prob: float = 0.3,
    max_turns: int = 8,
    max_context: int = 8192,
    num_system_prompts: int = 4,
    system_prompt_len: int = 128,
) -> list[Request]:
    """A synthetic trace: Poisson arrivals at `rate` req/s and multi-turn chats.

    A new chat starts with one of `num_system_prompts` shared system-prompt blocks (when > 0).
    A follow-up turn's input is its parent's input + the parent's output + a new user message,
    and its `hash_ids` start with all of the parent's, so the parent prompt is a prefix of it.
    """
    rng = random.Random(seed)
    next_hash = 0

    def fresh(k: int) -> list[int]:
        nonlocal next_hash
        next_hash += k
        return list(range(next_hash - k, next_hash))

    sys_blocks = [fresh(system_prompt_len // BLOCK) for _ in range(num_system_prompts)]
    open_chats: list[Request] = []  # latest turn of chats that may continue
    trace: list[Request] = []
    t = 0.0
    for chat_id in range(n):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        new_len = sample_length(rng, input_dist, input_mean, input_sigma, min_input, max_input)
        out_len = sample_length(rng, output_dist, output_mean, output_sigma, min_output, max_output)
        parent = None
        if open_chats and rng.random() < followup_prob:
            parent = open_chats.pop(rng.randrange(len(open_chats)))
            length = parent["input_length"] + parent["output_length"] + new_len
            if length + out_len > max_context:
                parent = None  # too long: start a new chat instead
        if parent is not None:
            prefix = list(parent["hash_ids"])
            turn = parent["turn"] + 1
            parent_id = parent["chat_id"]
        else:
            prefix = list(rng.choice(sys_blocks)) if sys_blocks else []
            length = len(prefix) * BLOCK + new_len
            turn, parent_id = 1, -1
        hash_ids = prefix + fresh(math.ceil(length / BLOCK) - len(prefix))
        req: Request = {
            "chat_id": chat_id,
            "parent_chat_id": parent_id,
            "timestamp": round(t, 3),
            "input_length": length,
            "output_length": out_len,
            "type": "text",
            "turn": turn,
            "hash_ids": hash_ids,
        }
        trace.append(req)
        if turn < max_turns:
            open_chats.append(req)
    return trace


def save(trace: list[Request], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps(r) + "\n")


def load(path: str | Path, n: int | None = None, scale: float = 1.0) -> list[Request]:
    """The first `n` requests (all if None), timestamps made relative to the first and times `scale`."""
    trace: list[Request] = []
    with open(path) as f:
        for line in f:
            if n is not None and len(trace) >= n:
                break
            if line.strip():
                trace.append(json.loads(line))
    if trace:
        t0 = min(float(r["timestamp"]) for r in trace)
        for r in trace:
            r["timestamp"] = (float(r["timestamp"]) - t0) * scale
        trace.sort(key=lambda r: r["timestamp"])
    return trace


def poisson_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process at `rate` req/s (all zero when rate <= 0 or inf)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if 0 < rate < math.inf:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def block_tokens(hash_id: int | str, vocab: int) -> list[int]:
    """The 16 token ids of one block: a deterministic function of the hash id."""
    rng = random.Random(hash_id)  # int and str seeds are stable across processes
    return [rng.randrange(vocab) for _ in range(BLOCK)]


def build_prompt(hash_ids: list[int], input_length: int, vocab: int) -> list[int]:
    """Token ids for a request: one block per hash id, cut to `input_length`.

    If `hash_ids` covers fewer than `input_length` tokens, the rest is filled with blocks derived
    from the last id (so the prompt length always equals `input_length`).
    """
    tokens: list[int] = []
    for h in hash_ids:
        if len(tokens) >= input_length:
            break
        tokens.extend(block_tokens(h, vocab))
    extra = 0
    while len(tokens) < input_length:
        extra += 1
        tokens.extend(block_tokens(f"fill:{hash_ids[-1] if hash_ids else 0}:{extra}", vocab))
    return tokens[:input_length]


def download(out: str | Path, timeout: float = 60.0) -> Path:
    """Fetch the real trace (best effort; raises RuntimeError naming the URLs tried when offline)."""
    errors = []
    for url in DOWNLOAD_URLS:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                data = resp.read()
            first = data.split(b"\n", 1)[0]
            json.loads(first)  # not an LFS pointer or an HTML page
            Path(out).write_bytes(data)
            return Path(out)
        except Exception as e:  # noqa: BLE001 - report every failure together
            errors.append(f"  {url}: {e}")
    raise RuntimeError(
        "could not download the trace (no internet?); tried:\n"
        + "\n".join(errors)
        + "\nuse `trace.py generate` for a synthetic trace in the same format"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--download" in argv:  # `--download` is an alias of the `download` command
        argv = ["download"] + [a for a in argv if a != "--download"]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch the real Qwen trace")
    d.add_argument("-o", "--output", default=TRACE_NAME)
    g = sub.add_parser("generate", help="write a synthetic trace")
    g.add_argument("-o", "--output", required=True)
    g.add_argument("-n", "--num-requests", type=int, default=1000)
    g.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, req/s")
    g.add_argument("--seed", type=int, default=0)
    for kind, mean, sigma, lo, hi in (("input", 512, 1.0, 16, 4096), ("output", 128, 0.8, 1, 1024)):
        g.add_argument(f"--{kind}-dist", choices=["lognormal", "uniform"], default="lognormal")
        g.add_argument(f"--{kind}-mean", type=float, default=mean, help="lognormal mean")
        g.add_argument(f"--{kind}-sigma", type=float, default=sigma, help="lognormal sigma")
        g.add_argument(f"--min-{kind}", type=int, default=lo)
        g.add_argument(f"--max-{kind}", type=int, default=hi)
    g.add_argument(
        "--followup-prob", type=float, default=0.3, help="chance a request continues a chat"
    )
    g.add_argument("--max-turns", type=int, default=8)
    g.add_argument(
        "--max-context", type=int, default=8192, help="input + output cap of a follow-up"
    )
    g.add_argument("--num-system-prompts", type=int, default=4)
    g.add_argument("--system-prompt-len", type=int, default=128, help="tokens (multiple of 16)")
    a = p.parse_args(argv)
    if a.cmd == "download":
        try:
            print(f"wrote {download(a.output)}")
        except RuntimeError as e:
            sys.exit(str(e))
        return
    kw = {k: v for k, v in vars(a).items() if k not in ("cmd", "output", "num_requests")}
    trace = generate(a.num_requests, **kw)
    save(trace, a.output)
    shared = sum(1 for r in trace if r["turn"] > 1)
    print(
        f"wrote {len(trace)} requests ({shared} follow-up turns) over {trace[-1]['timestamp']:.1f} s "
        f"to {a.output}"
    )


if __name__ == "__main__":
    main()
