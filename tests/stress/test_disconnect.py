"""Disconnects: 100 streams dropped after a couple of chunks -> within 2 s no request runs and
the KV pages held by requests are back to the idle value."""

from __future__ import annotations

import asyncio
import time

import httpx
from stress_helpers import PROMPT, busy_pages, server, wait_idle  # noqa: F401 (fixture)

N = 100


def test_100_dropped_streams(server):
    """100 concurrent streams each dropped after two chunks: within 2 s of the drop no request runs
    and the KV pages held by requests are back to the idle value."""
    idle = busy_pages(server.metrics())
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def one(ac: httpx.AsyncClient, i: int) -> int:
        chunks = 0
        async with ac.stream(
            "POST", "/v1/completions", json={**body, "prompt": f"{PROMPT} {i}"}
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if chunks >= 2:
                        break  # leaving the block closes the connection mid-stream
        return chunks

    async def main():
        limits = httpx.Limits(max_connections=N + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(N)))

    chunks = asyncio.run(main())
    assert all(c == 2 for c in chunks)
    t_drop = time.monotonic()
    waited, m = wait_idle(server, idle, within=2.0)
    assert m["minisgl_num_running_reqs"] == 0, m
    assert busy_pages(m) == idle, m
    assert time.monotonic() - t_drop <= 2.5
    text = httpx.get(server.url + "/metrics").text
    aborted = [
        ln
        for ln in text.splitlines()
        if ln.startswith('minisgl_request_finished_total{reason="abort"}')
    ]
    print(
        f"\nDISCONNECT: {N} streams dropped after 2 chunks; idle after {waited:.2f}s "
        f"(running {m['minisgl_num_running_reqs']:.0f}, busy pages {busy_pages(m):.0f} = idle "
        f"{idle:.0f}, cached {m['minisgl_kv_pages_cached']:.0f}); {aborted}"
    )


def test_200_clients_leave_before_first_token(server):
    """200 clients send ~400-token prompts and hang up at once (issue 17 item 3): the API notices
    while they are queued, so most prompts are never prefilled, and the server is idle soon."""
    import random

    from stress_helpers import http_raw, post_bytes

    idle = busy_pages(server.metrics())
    prefill0 = server.metrics()["minisgl_prefill_tokens_total"]
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(399)] for _ in range(200)]
    for p in prompts:
        s = http_raw(server.url, post_bytes("/v1/completions", {"prompt": p, "max_tokens": 16}))
        s.close()
    waited, m = wait_idle(server, idle, within=10)
    assert m["minisgl_num_running_reqs"] == 0 and busy_pages(m) == idle, m
    prefilled = m["minisgl_prefill_tokens_total"] - prefill0
    assert prefilled < 0.5 * 200 * 400, prefilled
    print(
        f"\nEARLY DISCONNECT: 200 clients x 400-token prompts hung up at once: {prefilled:.0f} of "
        f"80000 prompt tokens prefilled; idle {waited:.2f} s after the last one"
    )
