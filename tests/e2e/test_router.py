"""Replicas behind sglang-router (issue 20): two tiny Qwen3 servers on CPU and the real router
(`python -m sglang_router.launch_router`, the `sglang-router` dev dependency) on loopback.

- the router registers both workers from /server_info and /model_info, reads their /get_load,
  fans POST /flush_cache out (refused by a worker while a request runs), and every request it
  forwards (with the SGLang fields it adds:
  no_stop_trim, skip_special_tokens, return_hidden_states, log_metrics, ...) is accepted;
- 200 greedy requests through a round-robin router, over /v1/completions, /v1/chat/completions
  and /generate, all equal to the same request sent straight to a replica, both replicas used;
- the cache-aware policy sends requests sharing a long prefix to one replica, visible in
  usage.prompt_tokens_details.cached_tokens and in each replica's prompt-token counter;
- a replica SIGKILLed in the middle of 100 more requests: every request started after the kill
  succeeds with the right text (the router retries the dead worker's connection errors on the
  live one), and the router marks the dead worker unhealthy.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from procs import alive, descendants, free_port

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NAME = "tiny"  # --served-model-name: the router's model id for both workers
PROMPTS = ["The cat saw", "A dog found the", "The old man made", "My friend gave"]
PROMPTS += ["The king watched a", "A sleepy bear", "The tiny robot built", "Her mother"]


class Proc:
    """A subprocess with its log, killed with everything it started at the end."""

    def __init__(self, tmp: Path, name: str, cmd: list[str]) -> None:
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=ENV
        )
        self.pids: set[int] = set()

    def wait_for(self, url: str, ok, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited early:\n{self.log.read_text()[-3000:]}"
            try:
                r = httpx.get(url, timeout=2)
                if r.status_code == 200 and ok(r):
                    self.pids = descendants(self.proc.pid)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{url} not ready in time:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in descendants(self.proc.pid) | self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _metric(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics", timeout=5).text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def cluster(qwen3_tied_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    procs: list[Proc] = []
    try:
        replicas = []
        for i in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "minisgl", "--model", qwen3_tied_dir, "--device", "cpu"]
            cmd += ["--dtype", "float32", "--port", str(port), "--served-model-name", NAME]
            procs.append(Proc(tmp, f"replica{i}", cmd))
            replicas.append(f"http://127.0.0.1:{port}")
        routers = {}
        for policy in ("round_robin", "cache_aware"):
            port = free_port()
            cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *replicas]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--policy", policy]
            cmd += ["--prometheus-port", str(free_port()), "--health-check-interval-secs", "1"]
            cmd += ["--shutdown-grace-period-secs", "1", "--log-level", "warn"]
            procs.append(Proc(tmp, f"router-{policy}", cmd))
            routers[policy] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        for p, url in zip(procs, replicas):
            p.wait_for(url + "/health", lambda r: True, deadline)
        for p, url in zip(procs[2:], routers.values()):
            p.wait_for(url + "/readiness", lambda r: r.json()["healthy_workers"] == 2, deadline)
        yield {"replicas": replicas, "routers": routers, "procs": procs, "model": qwen3_tied_dir}
    finally:
        for p in procs:
            p.kill()


def _ask(client: httpx.Client, url: str, kind: str, prompt: str) -> str:
    """One greedy request of `kind`; returns its text."""
    if kind == "completion":
        body = {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        r = client.post(url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    if kind == "chat":
        msgs = [{"role": "user", "content": prompt}]
        body = {"model": NAME, "messages": msgs, "max_tokens": 8, "temperature": 0}
        r = client.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    r = client.post(url + "/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["text"]


KINDS = ("completion", "chat", "generate")
JOBS = [(k, p) for k in KINDS for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(cluster) -> dict[tuple[str, str], str]:
    with httpx.Client(timeout=30) as c:
        ref = {job: _ask(c, cluster["replicas"][0], *job) for job in JOBS}
        assert all(_ask(c, cluster["replicas"][1], *job) == ref[job] for job in JOBS[::5])
    assert len(set(ref.values())) > len(JOBS) // 2  # the tiny model's answers differ
    return ref


def test_router_registers_workers_from_their_info_routes(cluster):
    """The router lists the served model, registers both replicas as healthy qwen3 workers with load
    0, relays /get_model_info and fans /flush_cache out to both; a replica refuses a flush with a
    400 while a request runs and frees the cached tokens once idle, rejects no_stop_trim=true, and a
    sampling_seed forwarded on /generate gives the same text every time."""
    router, (a, b) = cluster["routers"]["round_robin"], cluster["replicas"]
    assert [m["id"] for m in httpx.get(router + "/v1/models").json()["data"]] == [NAME]
    workers = httpx.get(router + "/workers").json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted([a, b])
    for w in workers:
        assert w["model_id"] == NAME and w["is_healthy"], w
        assert w["metadata"]["model_type"] == "qwen3", w
    # /get_load parsed: an unparsable answer reads as load -1
    assert [w["load"] for w in httpx.get(router + "/get_loads").json()["workers"]] == [0, 0]
    assert httpx.get(router + "/get_model_info").json()["architectures"] == ["Qwen3ForCausalLM"]
    r = httpx.post(router + "/flush_cache", timeout=30)
    assert r.status_code == 200 and r.json()["workers_flushed"] == 2, r.text
    info = httpx.get(a + "/get_server_info").json()
    assert info["served_model_name"] == NAME and info["tp_size"] == 1
    assert info["max_total_tokens"] > 0 and info["page_size"] == 1
    # a flush is refused while a request runs, and frees the cached prefixes once idle
    body = {"model": NAME, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", a + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        busy = httpx.post(a + "/flush_cache")
        assert sum(line.startswith("data: {") for line in lines) > 100  # it ran to the end
        assert busy.status_code == 400 and "requests are running" in busy.text, busy.text
    r = httpx.post(a + "/flush_cache")
    assert r.status_code == 200 and r.json()["freed_tokens"] >= 401, r.text  # <s> x + 400
    # the router's fields at other values ask for what minisgl does not do
    body = {"model": NAME, "prompt": "x", "max_tokens": 2, "no_stop_trim": True}
    r = httpx.post(a + "/v1/completions", json=body)
    assert r.status_code == 400 and "no_stop_trim: Input should be False" in r.text, r.text
    # the only seed the router forwards on /generate is SGLang's sampling_seed
    body = {"text": "x", "sampling_params": {"max_new_tokens": 6, "sampling_seed": 5}}
    outs = {httpx.post(router + "/generate", json=body).json()["text"] for _ in range(3)}
    assert len(outs) == 1


def test_cache_aware_sends_a_shared_prefix_to_one_replica(cluster):
    """Six requests sharing a ~100-token prefix: the cache-aware router keeps them on one
    replica (5 of 6 hit the prefix cache); round robin spreads them (2 of 6 miss)."""
    from transformers import AutoTokenizer

    replicas = cluster["replicas"]
    tok = AutoTokenizer.from_pretrained(cluster["model"])
    with httpx.Client(timeout=30) as c:
        for policy, head in (("cache_aware", "The girl painted"), ("round_robin", "A fox opened")):
            router = cluster["routers"][policy]
            assert c.post(router + "/flush_cache").status_code == 200
            prefix = " ".join(f"{head} a red ball number {i} near the lake." for i in range(6))
            n_prefix = len(tok(prefix).input_ids)
            before = [_metric(u, "minisgl_prompt_tokens_total") for u in replicas]
            cached = []
            for i in range(6):
                body = {"model": NAME, "prompt": f"{prefix} Then {i}", "max_tokens": 2}
                r = c.post(router + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            grew = [_metric(u, "minisgl_prompt_tokens_total") > x for u, x in zip(replicas, before)]
            hits = sum(n >= n_prefix - 1 for n in cached)
            if policy == "cache_aware":
                assert grew.count(True) == 1 and hits == 5 and cached[0] <= 1, (grew, cached)
            else:
                assert grew == [True, True] and hits == 4, (grew, cached, n_prefix)


def test_200_requests_then_a_replica_dies(cluster, reference):
    """200 greedy requests through the round-robin router (completions, chat and /generate) all
    equal the same request sent straight to a replica, and both replicas serve; after one replica is
    SIGKILLed mid-load, every request started after the kill gets the right text, at most 8 in
    flight fail, the replica leaves no process and the router marks it unhealthy."""
    router, replicas = cluster["routers"]["round_robin"], cluster["replicas"]
    before = [_metric(u, "minisgl_prompt_tokens_total") for u in replicas]
    results: list[tuple[float, tuple[str, str], str | None]] = []
    lock = threading.Lock()

    def run(job: tuple[str, str], client: httpx.Client) -> None:
        t0 = time.monotonic()
        try:
            text = _ask(client, router, *job)
        except (AssertionError, httpx.HTTPError) as e:
            text = None
            print(f"{job}: {e}")
        with lock:
            results.append((t0, job, text))

    with httpx.Client(timeout=60) as c, cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda j: run(j, c), [JOBS[i % len(JOBS)] for i in range(200)]))
        assert len(results) == 200
        bad = [(job, text) for _, job, text in results if text != reference[job]]
        assert not bad, bad[:5]
        after = [_metric(u, "minisgl_prompt_tokens_total") for u in replicas]
        assert all(x > y for x, y in zip(after, before)), (before, after)  # both served

        victim = cluster["procs"][1]
        futs = [ex.submit(run, JOBS[i % len(JOBS)], c) for i in range(100)]
        while sum(f.done() for f in futs) < 30:
            time.sleep(0.01)
        t_kill = time.monotonic()
        victim.kill()
        cf.wait(futs)
    later = [(job, text) for t0, job, text in results[200:] if t0 > t_kill]
    assert len(later) >= 50, len(later)
    bad = [(job, text) for job, text in later if text != reference[job]]
    assert not bad, bad[:5]
    in_flight = [text for t0, _, text in results[200:] if t0 <= t_kill]
    assert in_flight.count(None) <= 8, in_flight
    assert not [p for p in victim.pids if alive(p)], "the killed replica left processes"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        health = {
            w["url"]: w["is_healthy"] for w in httpx.get(router + "/workers").json()["workers"]
        }
        if health == {replicas[0]: True, replicas[1]: False}:
            break
        time.sleep(0.2)
    assert health == {replicas[0]: True, replicas[1]: False}, health
