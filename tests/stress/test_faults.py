"""Faults: SIGKILL of the scheduler, the detokenizer or one tokenizer worker (a fresh server
each) -> /health 503 within 2 s, in-flight streaming clients get an error (no hang), the
launcher exits non-zero and no process of the tree remains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from stress_helpers import PROMPT, alive, comm, descendants, start_server

RESULTS: dict[str, str] = {}


@pytest.mark.parametrize("victim", ["minisgl:sched0", "minisgl:detok", "minisgl:tok1"])
def test_worker_sigkill(tmp_path_factory, small_llama_dir, victim):
    s = start_server(tmp_path_factory, small_llama_dir, "--num-tokenizer", "2")
    try:
        pids = descendants(s.proc.pid)  # collected before the kill, recursively
        names = sorted(comm(p) for p in pids)
        target = s.worker_pid(victim)
        body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}

        async def stream_one(ac: httpx.AsyncClient, started: asyncio.Event) -> str:
            try:
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        return f"http {r.status_code}"
                    async for line in r.aiter_lines():
                        started.set()
                        if line.startswith("data: ") and line != "data: [DONE]":
                            obj = json.loads(line[6:])
                            if "error" in obj:
                                return "error event"
                            if obj["choices"][0]["finish_reason"]:
                                return "finished"
                return "closed without error"
            except httpx.TransportError as e:
                return f"transport error {type(e).__name__}"

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=10) as ac:
                started = asyncio.Event()
                tasks = [asyncio.create_task(stream_one(ac, started)) for _ in range(4)]
                await asyncio.wait_for(started.wait(), 30)
                os.kill(target, signal.SIGKILL)
                t0 = time.monotonic()
                t503 = None
                while time.monotonic() - t0 < 2.0:
                    try:
                        if (await ac.get("/health", timeout=1)).status_code == 503:
                            t503 = time.monotonic() - t0
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.02)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 10)  # nobody hangs
                return t503, results, time.monotonic() - t0

        t503, results, t_clients = asyncio.run(main())
        assert t503 is not None, "/health not 503 within 2 s"
        assert all(r == "error event" or r.startswith(("http 5", "transport")) for r in results), (
            results
        )
        rc = s.proc.wait(10)
        t_exit = time.monotonic()
        assert rc != 0
        while any(alive(p) for p in pids) and time.monotonic() - t_exit < 5:
            time.sleep(0.05)
        left = [(p, comm(p)) for p in pids if alive(p)]
        assert not left, f"orphans: {left}"
        RESULTS[victim] = (
            f"{victim}: health 503 after {t503 * 1000:.0f} ms, clients done after {t_clients:.2f}s "
            f"({results}), launcher rc={rc}, {len(pids)} descendants {names} all gone"
        )
        print("\nFAULT " + RESULTS[victim])
    finally:
        s.stop()
