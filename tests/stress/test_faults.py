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
    """SIGKILL of the scheduler, the detokenizer or one of two tokenizer workers under 4 streams:
    /health is 503 within 2 s, every stream ends with an error event, a 5xx or a transport error
    (none hangs or finishes), the launcher exits non-zero and no process of the tree is left."""
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


# ---- issue 17 item 2: a worker that is alive but stuck -------------------------------------------
def test_worker_sigstop(tmp_path_factory, small_llama_dir):
    """SIGSTOP of the scheduler, the detokenizer, then the tokenizer (one server, in turn):
    /health turns 503 within 10 s naming the worker, a request meanwhile ends with a clean 504
    after --request-timeout (3 s here), and after SIGCONT /health is 200 again and a greedy
    request gets the exact text."""
    s = start_server(tmp_path_factory, small_llama_dir, "--request-timeout", "3")
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    lines = []
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            expected = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
            for victim, name in [("minisgl:sched0", "scheduler0"), ("minisgl:detok", "detokenizer"),
                                 ("minisgl:tok0", "tokenizer-0")]:  # fmt: skip
                pid = s.worker_pid(victim)
                os.kill(pid, signal.SIGSTOP)
                t0 = time.monotonic()
                try:
                    while (h := c.get("/health")).status_code == 200:
                        assert time.monotonic() - t0 < 10, "/health still 200 after 10 s"
                        time.sleep(0.1)
                    t503 = time.monotonic() - t0
                    assert h.status_code == 503 and name in h.json()["error"]["message"], h.text
                    t1 = time.monotonic()
                    r = c.post("/v1/completions", json=body)  # while stopped
                    took = time.monotonic() - t1
                    assert (
                        r.status_code == 504 and "request-timeout" in r.json()["error"]["message"]
                    )
                    r = c.post("/v1/completions", json={**body, "stream": True})
                    assert r.status_code == 504, r.text  # no first token: an HTTP error
                finally:
                    os.kill(pid, signal.SIGCONT)
                t1 = time.monotonic()
                while c.get("/health").status_code != 200:
                    assert time.monotonic() - t1 < 10, "/health not 200 again within 10 s"
                    time.sleep(0.1)
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, r.text
                lines.append(f"{victim}: request 504 after {took:.1f} s, /health 503 after "
                             f"{t503:.1f} s, 200 again {time.monotonic() - t1:.1f} s after SIGCONT")  # fmt: skip
        assert s.proc.poll() is None
    finally:
        s.stop()
    print("\nSTALL " + "; ".join(lines))


# ---- issue 17 item 9: the launcher SIGKILLed -------------------------------------------------------
def test_launcher_sigkill_cleans_up(tmp_path_factory, small_llama_dir):
    """SIGKILL of the launcher: every worker notices, exits, and the socket directory is gone."""
    s = start_server(tmp_path_factory, small_llama_dir)
    try:
        sock_dir, pids = s.socket_dir(), descendants(s.proc.pid)
        assert sock_dir.is_dir() and sock_dir.name.startswith("minisgl-")
        os.kill(s.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while (any(alive(p) for p in pids) or sock_dir.exists()) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        left = [(p, comm(p)) for p in pids if alive(p)]
        assert not left and not sock_dir.exists(), (left, sock_dir.exists())
    finally:
        s.stop()
    print(
        f"\nLAUNCHER SIGKILL: {len(pids)} workers gone and {sock_dir} removed after "
        f"{time.monotonic() - t0:.2f} s"
    )
