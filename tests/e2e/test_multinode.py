"""Tensor parallelism across nodes on CPU (issue 20): two launches on loopback act as two nodes.

`--tp 2 --nnodes 2 --node-rank R --dist-init-addr 127.0.0.1:PORT`: node 0 serves HTTP and runs
rank 0, node 1 runs rank 1 only; they meet over gloo. Two such pairs and a tp=1 server start
together. Pair A: greedy outputs equal tp=1's, then SIGTERM to node 0 stops both nodes with
status 0. Pair B: SIGKILL of node 1's launcher (its rank dies with it) brings node 0 down with
status 1 and a clear log line; neither pair leaves a process behind. Bad node flags exit 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import _build
from procs import alive, comm, descendants, free_port

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPTS = [[1, 45, 120, 200, 33, 7], [1, 300, 12], [1, 5, 99, 250, 251, 17, 64, 380, 42, 11]]


class Node:
    def __init__(self, tmp: Path, model: str, name: str, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "minisgl", "--model", model, "--device", "cpu"]
        cmd += ["--dtype", "float32", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=ENV
        )
        self.pids: set[int] = set()
        self.serves = "--node-rank 1" not in " ".join(flags)

    def left(self) -> list[int]:
        return [p for p in self.pids | descendants(self.proc.pid) if alive(p)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.left():
            os.kill(pid, signal.SIGKILL)


def _wait_ready(nodes: list[Node], deadline: float) -> None:
    """Until every HTTP-serving node answers /health, then the pids of everything started."""
    for n in nodes:
        while True:
            assert time.monotonic() < deadline, f"not ready:\n{n.log.read_text()[-3000:]}"
            assert n.proc.poll() is None, f"exited early:\n{n.log.read_text()[-3000:]}"
            try:
                if not n.serves or httpx.get(n.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    for n in nodes:
        n.pids = descendants(n.proc.pid)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    model = _build(
        tmp_path_factory, "mn_kv2", "Qwen3Config", "Qwen3ForCausalLM", seed=11,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    out: dict[str, Node] = {}
    try:
        out["tp1"] = Node(tmp, model, "tp1", [])
        for pair in "AB":
            addr = f"127.0.0.1:{free_port()}"
            for rank in (0, 1):
                flags = ["--tp", "2", "--nnodes", "2", "--node-rank", str(rank)]
                out[f"{pair}{rank}"] = Node(
                    tmp, model, f"{pair}{rank}", flags + ["--dist-init-addr", addr]
                )
        _wait_ready(list(out.values()), time.monotonic() + 120)
        yield out
    finally:
        for n in out.values():
            n.kill()


def _generate(url: str, ids: list[int]) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 24}}
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def test_two_nodes_greedy_equals_tp1_and_stop_cleanly(nodes):
    """Two nodes serving tp=2 give the same greedy output ids as a tp=1 server, /server_info reports
    tp_size 2 over 2 nodes and node 1 runs only its scheduler rank; SIGTERM to node 0 stops both
    nodes with status 0, node 1 logging that node 0 shut the group down, and leaves no process."""
    tp1, n0, n1 = nodes["tp1"], nodes["A0"], nodes["A1"]
    for ids in PROMPTS:
        want = _generate(tp1.url, ids)
        assert len(set(want)) > 3, want
        assert _generate(n0.url, ids) == want, ids
    info = httpx.get(n0.url + "/server_info").json()
    assert (info["tp_size"], info["nnodes"]) == (2, 2)
    names = {comm(p) for p in n1.pids}  # node 1 runs its rank only
    assert "minisgl:sched1" in names and not names & {"minisgl:sched0", "minisgl:detok"}, names
    n0.proc.send_signal(signal.SIGTERM)
    assert n0.proc.wait(15) == 0, n0.log.read_text()[-3000:]
    assert n1.proc.wait(15) == 0, n1.log.read_text()[-3000:]
    assert "node 0 shut the TP group down" in n1.log.read_text()
    time.sleep(0.2)
    assert not n0.left() and not n1.left()


def test_a_dead_node_brings_the_other_down(nodes):
    """After a request matching tp=1's, killing node 1's launcher brings node 0 down within 15 s
    with status 1, its log saying rank 0 lost the TP group; neither node leaves a process."""
    n0, n1 = nodes["B0"], nodes["B1"]
    assert _generate(n0.url, PROMPTS[0]) == _generate(nodes["tp1"].url, PROMPTS[0])
    n1.proc.kill()  # node 1's launcher; PR_SET_PDEATHSIG takes its rank with it
    n1.proc.wait()
    try:
        assert n0.proc.wait(15) == 1
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"node 0 still up 15 s after node 1 died:\n{n0.log.read_text()}"
        ) from e
    log = n0.log.read_text()
    assert "rank 0 lost the TP group" in log and "exited with code 1" in log, log[-3000:]
    time.sleep(0.2)
    assert not n0.left() and not n1.left(), (n0.left(), n1.left())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp", "2", "--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr HOST:PORT"),
        (
            ["--tp", "3", "--nnodes", "2", "--dist-init-addr", "h:1"],
            "must be a multiple of --nnodes",
        ),
        (
            ["--tp", "2", "--nnodes", "2", "--node-rank", "2"],
            "--node-rank must be in [0, --nnodes)",
        ),
    ],
)
def test_bad_node_flags_fail_at_start(flags, message):
    """--nnodes 2 without --dist-init-addr, a --tp that is not a multiple of --nnodes, or a
    --node-rank outside [0, --nnodes) exits with status 2 and a message saying so, no traceback."""
    cmd = [sys.executable, "-m", "minisgl", "--model", "unused", "--device", "cpu", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=ENV)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
