"""Load: 500 concurrent streaming requests all get the exact greedy text; afterwards no request
runs and the KV pages held by requests are back to the idle value."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from stress_helpers import busy_pages, descendants, server, wait_idle  # noqa: F401 (fixture)

N = 500
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben", "One day a bird", "The sun"]


def test_500_concurrent_streams(server):
    """500 concurrent streams all get the exact greedy text of their prompt; within 5 s afterwards
    no request runs, the KV pages held by requests are back to the idle value, and the server's
    memory has grown by less than 25% + 100 MB."""
    idle = busy_pages(server.metrics())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        expected = {}
        for p in PROMPTS:
            r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 32, "temperature": 0})
            assert r.status_code == 200, r.text
            expected[p] = r.json()["choices"][0]["text"]

    async def one(ac: httpx.AsyncClient, p: str) -> tuple[str, float]:
        t0 = time.monotonic()
        body = {"prompt": p, "max_tokens": 32, "temperature": 0, "stream": True}
        text = ""
        async with ac.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, time.monotonic() - t0

    async def main():
        limits = httpx.Limits(max_connections=N + 10, max_keepalive_connections=N + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as ac:
            return await asyncio.gather(*(one(ac, PROMPTS[i % len(PROMPTS)]) for i in range(N)))

    rss_before = _rss_mb(server.proc.pid)
    t0 = time.monotonic()
    results = asyncio.run(main())
    total = time.monotonic() - t0
    wrong = [
        i for i, (text, _) in enumerate(results) if text != expected[PROMPTS[i % len(PROMPTS)]]
    ]
    assert not wrong, f"{len(wrong)} wrong texts, e.g. {results[wrong[0]][0]!r}"
    waited, m = wait_idle(server, idle, within=5)
    assert m["minisgl_num_running_reqs"] == 0, m
    assert busy_pages(m) == idle, m
    rss_after = _rss_mb(server.proc.pid)
    # allocators keep some freed memory: a leak of per-request state would grow far beyond this
    assert rss_after < rss_before * 1.25 + 100, (rss_before, rss_after)
    lat = sorted(d for _, d in results)
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
    print(
        f"\nLOAD: {N} streams x 32 tokens in {total:.2f}s = {N / total:.1f} req/s, "
        f"{N * 32 / total:.0f} tok/s; latency p50 {p50:.2f}s p99 {p99:.2f}s; "
        f"idle again after {waited:.2f}s (busy pages {busy_pages(m):.0f}, idle {idle:.0f}); "
        f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB"
    )


def _rss_mb(pid: int) -> float:
    """Resident memory of the server: the launcher and every worker process."""
    total = 0
    for p in {pid} | descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def test_big_request_beside_small(server):
    """Issue 17 item 5 with the default limits: 256 prompts x n=16 is refused (400, over
    --max-choices 256); 256 prompts x n=1 (64 tokens each) run in windows of 64 choices, so a
    4-token request sent just after it is done long before it."""
    body = {"prompt": [f"{PROMPTS[i % 5]} {i}" for i in range(256)], "max_tokens": 64,
            "ignore_eos": True}  # fmt: skip

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            r = await ac.post("/v1/completions", json={**body, "n": 16})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
            t0 = time.monotonic()
            big = asyncio.create_task(ac.post("/v1/completions", json=body))
            while not server.metrics().get("minisgl_num_running_reqs"):
                await asyncio.sleep(0.02)
            r = await ac.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4})
            small = time.monotonic() - t0
            assert r.status_code == 200 and not big.done()
            rb = await big
            assert rb.status_code == 200 and len(rb.json()["choices"]) == 256, rb.text[:300]
            return small, time.monotonic() - t0

    small, big = asyncio.run(main())
    print(
        f"\nBIG BESIDE SMALL: 256 x 16 choices -> 400; 4-token request beside 256 choices x 64 "
        f"tokens done after {small:.2f} s (the big one after {big:.2f} s)"
    )
