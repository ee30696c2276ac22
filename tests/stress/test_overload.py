"""Overload (issue 17 items 3, 4, 5): admission control with 429 + Retry-After, fair submission
so a big request does not starve a small one, clients that leave while queued, and clients that
never read their stream.

The `tight` server runs with --max-running-requests 4 (so requests queue), --max-waiting-requests
12, --max-choices 8, --max-waiting-tokens 1500; the `stall` one with --stall-timeout 2."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import httpx
import pytest
from stress_helpers import PROMPT, busy_pages, http_raw, post_bytes, start_server, wait_idle

COMP = "/v1/completions"
LONG = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory, small_llama_dir) -> str:
    """small_llama with a 4,096-token context (same weights; RoPE without scaling computes the
    same angles), so a long request can outlast the 0.5 s metrics period several times over:
    480 tokens take ~0.9 s on a 2-core CPU."""
    d = tmp_path_factory.mktemp("long_llama") / "m"
    shutil.copytree(small_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    return str(d)


@pytest.fixture(scope="module")
def tight(tmp_path_factory, long_llama_dir):
    s = start_server(
        tmp_path_factory, long_llama_dir, "--max-running-requests", "4", "--max-waiting-requests", "12",
        "--max-choices", "8", "--max-waiting-tokens", "1500",
    )  # fmt: skip
    yield s
    s.stop()


async def _fill_batch(
    ac: httpx.AsyncClient, k: int = 4, max_tokens: int = 480
) -> list[asyncio.Task]:
    """k long requests that hold the whole running batch (--max-running-requests 4) for a while;
    returns once each has produced its first token (so they no longer count as waiting)."""
    started = [asyncio.Event() for _ in range(k)]

    async def one(ev: asyncio.Event) -> int:
        async with ac.stream(
            "POST", COMP, json={**LONG, "stream": True, "max_tokens": max_tokens}
        ) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                ev.set()
        return r.status_code

    tasks = [asyncio.create_task(one(ev)) for ev in started]
    await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 60)
    return tasks


def test_admission_limits(tight):
    """Over --max-choices: 400. With the batch full, 20 concurrent requests: 12 are queued (and
    later served), 8 get 429 with Retry-After at once. Prompt tokens over --max-waiting-tokens:
    429 from the scheduler."""

    async def main():
        async with httpx.AsyncClient(base_url=tight.url, timeout=120) as ac:
            r = await ac.post(COMP, json={"prompt": [PROMPT] * 3, "n": 3, "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
            longs = await _fill_batch(ac)
            t0 = time.monotonic()

            async def small() -> tuple[int, float, str | None]:
                r = await ac.post(COMP, json={"prompt": PROMPT, "max_tokens": 8})
                return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

            flood = await asyncio.gather(*(small() for _ in range(20)))
            await asyncio.gather(*longs)
            longs = await _fill_batch(ac)
            big = [[1] + [100 + i % 200 for i in range(399)]] * 5  # 5 prompts of 400 tokens
            tok = await asyncio.gather(
                *(ac.post(COMP, json={"prompt": p, "max_tokens": 4}) for p in big)
            )
            await asyncio.gather(*longs)
            return flood, tok

    flood, tok = asyncio.run(main())
    ok = [t for s, t, _ in flood if s == 200]
    busy = [t for s, t, ra in flood if s == 429 and ra == "1"]
    assert len(ok) == 12 and len(busy) == 8, flood
    assert max(busy) < min(ok)  # refused at once, not after waiting
    assert sorted(r.status_code for r in tok) == [200, 200, 200, 429, 429], [r.text for r in tok]
    assert all(
        "--max-waiting-tokens" in r.json()["error"]["message"] for r in tok if r.status_code == 429
    )
    print(f"\nADMISSION: batch full, 20 concurrent requests: 12 queued (served in {max(ok):.2f} s), "
          f"8 x 429 + Retry-After within {max(busy) * 1000:.0f} ms; 5 x 400-token prompts: "
          f"3 queued, 2 x 429 (--max-waiting-tokens 1500); 9 choices -> 400 (--max-choices 8)")  # fmt: skip


def test_big_request_does_not_starve_small(tight):
    """A request with 8 choices x 120 tokens (the most --max-choices allows) and then a 4-token
    request: the small one is done while the big one still has choices to run (at most
    max-running/4 = 1 choice of one request is in the engine at a time)."""

    async def main():
        async with httpx.AsyncClient(base_url=tight.url, timeout=120) as ac:
            done: list[int] = []
            body = {**LONG, "max_tokens": 120, "n": 8, "stream": True}

            async def big() -> None:
                async with ac.stream("POST", COMP, json=body) as r:
                    async for line in r.aiter_lines():
                        if '"finish_reason": "length"' in line:
                            done.append(1)

            task = asyncio.create_task(big())
            while not tight.metrics().get("minisgl_num_running_reqs"):
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            r = await ac.post(COMP, json={"prompt": PROMPT, "max_tokens": 4})
            small, finished_then = time.monotonic() - t0, len(done)
            await task
            return r, small, finished_then, len(done), time.monotonic() - t0

    r, small, then, total, big_t = asyncio.run(main())
    assert r.status_code == 200 and total == 8 and then < 8, (then, total)
    print(f"\nFAIRNESS: 4-token request beside an 8-choice one took {small:.2f} s (big: {big_t:.2f} s, "
          f"{then}/8 of its choices done by then)")  # fmt: skip


def test_disconnect_while_queued(tight):
    """With the batch full, 8 clients queue 150-token prompts and then hang up: within 2 s their
    requests have left the scheduler's queue, and none of their prompt tokens is ever prefilled."""

    async def main():
        async with httpx.AsyncClient(base_url=tight.url, timeout=120) as ac:
            # ~3,500 tokens: the batch stays full for several seconds, well past the ~1 s the
            # queue and metrics take (480 tokens were done before the queue emptied, at times)
            longs = await _fill_batch(ac, max_tokens=3500)
            prompt = [1] + [7 + i % 300 for i in range(149)]  # 8 x 150 < --max-waiting-tokens
            socks = [http_raw(tight.url, post_bytes(COMP, {"prompt": prompt, "max_tokens": 50}))
                     for _ in range(8)]  # fmt: skip
            deadline = time.monotonic() + 10
            while tight.metrics().get("minisgl_num_waiting_reqs") != 8:
                assert time.monotonic() < deadline, tight.metrics()
                await asyncio.sleep(0.05)
            prefill0 = tight.metrics()["minisgl_prefill_tokens_total"]
            for s in socks:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST
                s.close()
            t0 = time.monotonic()
            while (m := tight.metrics()).get("minisgl_num_waiting_reqs") != 0:
                assert time.monotonic() - t0 < 2, m
                await asyncio.sleep(0.05)
            gone = time.monotonic() - t0
            running = m["minisgl_num_running_reqs"]
            prefilled = tight.metrics()["minisgl_prefill_tokens_total"] - prefill0
            for t in longs:  # hang up on them too: the server aborts them
                t.cancel()
            await asyncio.gather(*longs, return_exceptions=True)
            return gone, running, prefilled

    gone, running, prefilled = asyncio.run(main())
    assert running == 4 and prefilled == 0, (running, prefilled)
    print(
        f"\nQUEUED DISCONNECT: 8 queued requests (8 x 150 prompt tokens) left the queue within "
        f"{gone:.2f} s of their clients leaving; prompt tokens prefilled for them: {prefilled:.0f}"
    )


# ---- clients that never read (item 4) ----------------------------------------------------------
def test_stalled_readers(tmp_path_factory, small_llama_dir):
    """Three times, 100 clients that never read (stream, n=4, 500 tokens, logprobs 20, a 4 KB receive
    buffer): their requests are aborted and their connections closed after --stall-timeout (2 s)
    once the bounded buffers are full, a probe is served at once, and the API process does not
    keep growing: what a wave took is reused by the next (the allocator keeps some)."""
    s = start_server(tmp_path_factory, small_llama_dir, "--stall-timeout", "2")
    body = {"prompt": PROMPT, "max_tokens": 500, "n": 4, "logprobs": 20, "ignore_eos": True,
            "stream": True}  # fmt: skip
    waves = []
    try:
        idle, rss = busy_pages(s.metrics()), [s.rss_mb()]
        for _ in range(3):
            gen0 = s.metrics().get("minisgl_generation_tokens_total", 0)
            socks = [http_raw(s.url, post_bytes(COMP, body), rcvbuf=4096) for _ in range(100)]
            t0 = time.monotonic()
            time.sleep(1)
            _, m = wait_idle(s, idle, within=30)
            assert m["minisgl_num_running_reqs"] == 0 and m["minisgl_api_inflight_requests"] == 0, m
            t_idle = time.monotonic() - t0
            closed = 0
            for c in socks:  # the server closed each connection: drain to EOF
                c.settimeout(10)
                try:
                    while c.recv(1 << 20):
                        pass
                    closed += 1
                except (TimeoutError, ConnectionResetError):
                    pass
                c.close()
            t_probe = time.monotonic()
            r = httpx.post(s.url + COMP, json={"prompt": PROMPT, "max_tokens": 8}, timeout=30)
            probe = time.monotonic() - t_probe
            assert r.status_code == 200 and closed == 100, (r.text, closed)
            gen = s.metrics()["minisgl_generation_tokens_total"] - gen0
            rss.append(s.rss_mb())
            waves.append(f"engine idle {t_idle:.1f} s after they connected, {gen:.0f} of 200000 "
                         f"tokens generated, 100/100 closed, probe {probe:.2f} s")  # fmt: skip
        # the first wave's growth is what --stall-timeout seconds of output buffer, so it scales
        # with the machine's speed (+130 MB on two loaded cores, +203 MB on two idle ones); the
        # property is the plateau: later waves reuse it instead of adding to it
        assert rss[1] < rss[0] + 300 and rss[3] < rss[2] + 40, rss
    finally:
        s.stop()
    print(
        f"\nSTALLED READERS (100 clients x n=4 x 500 tokens, never read): {'; '.join(waves)}; "
        f"API RSS {' -> '.join(f'{r:.0f}' for r in rss)} MB"
    )
