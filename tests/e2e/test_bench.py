"""Tests of the benchmark scripts: workload, trace generator, prompt building, percentiles, the
serving client (against a fake streaming server and a live CPU minisgl server), offline smoke
run, and plots."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmark"
PY = sys.executable


def load(rel: str) -> ModuleType:
    path = BENCH / rel
    spec = importlib.util.spec_from_file_location("test_bench_" + path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


trace = load("online/trace.py")
serving = load("online/bench_serving.py")
offline = load("offline/bench.py")


# ---------------------------------------------------------------- pure parts


def test_standard_workload_totals() -> None:
    """The standard offline workload (256 requests, seed 0) has 133,966 output tokens and 142,827
    prompt tokens, every id within [0, 10000]."""
    prompts, outs = offline.make_workload(256, 100, 1024, 100, 1024, 0, 10000)
    assert sum(outs) == offline.STANDARD_OUTPUT_TOKENS == 133_966
    assert sum(map(len, prompts)) == 142_827
    assert all(0 <= t <= 10000 for p in prompts for t in p)


def test_generate_deterministic_and_well_formed(tmp_path: Path) -> None:
    """trace.generate gives the same trace for a seed and another for another seed, timestamps
    sorted at about the asked rate (within 25%), every row with exactly the trace's keys and one
    hash id per 16-token block; a follow-up is the next turn of an earlier parent, starts with its
    hash ids and is longer than its input plus output; save then load with n and scale gives the
    first 50 rows, timestamps rebased and scaled."""
    a = trace.generate(300, rate=5.0, seed=1)
    assert a == trace.generate(300, rate=5.0, seed=1)
    assert a != trace.generate(300, rate=5.0, seed=2)
    ts = [r["timestamp"] for r in a]
    assert ts == sorted(ts) and 300 / ts[-1] == pytest.approx(5.0, rel=0.25)
    keys = {
        "chat_id",
        "parent_chat_id",
        "timestamp",
        "input_length",
        "output_length",
        "type",
        "turn",
        "hash_ids",
    }
    by_id = {r["chat_id"]: r for r in a}
    followups = 0
    for r in a:
        assert set(r) == keys
        assert len(r["hash_ids"]) == math.ceil(r["input_length"] / trace.BLOCK)
        if r["turn"] > 1:
            followups += 1
            parent = by_id[r["parent_chat_id"]]
            assert r["turn"] == parent["turn"] + 1 and parent["timestamp"] <= r["timestamp"]
            assert r["hash_ids"][: len(parent["hash_ids"])] == parent["hash_ids"]
            assert r["input_length"] > parent["input_length"] + parent["output_length"]
        else:
            assert r["parent_chat_id"] == -1
    assert followups > 30
    path = tmp_path / "t.jsonl"
    trace.save(a, path)
    back = trace.load(path, n=50, scale=2.0)
    assert len(back) == 50
    assert [r["timestamp"] for r in back] == pytest.approx(
        [2 * (r["timestamp"] - a[0]["timestamp"]) for r in a[:50]]
    )


def test_uniform_lengths_and_cli(tmp_path: Path) -> None:
    """trace.py's generate command with uniform length distributions writes 40 rows whose input and
    output lengths lie within the given bounds."""
    out = tmp_path / "u.jsonl"
    argv = [
        "generate",
        "-o",
        str(out),
        "-n",
        "40",
        "--rate",
        "100",
        "--input-dist",
        "uniform",
        "--min-input",
        "10",
        "--max-input",
        "20",
        "--output-dist",
        "uniform",
        "--min-output",
        "3",
        "--max-output",
        "5",
        "--num-system-prompts",
        "0",
        "--followup-prob",
        "0",
    ]
    subprocess.run([PY, str(BENCH / "online/trace.py"), *argv], check=True, capture_output=True)
    rows = trace.load(out)
    assert len(rows) == 40
    assert all(10 <= r["input_length"] <= 20 and 3 <= r["output_length"] <= 5 for r in rows)


def test_build_prompt_shares_prefixes() -> None:
    """build_prompt gives a prompt of the asked length inside the vocabulary; prompts share the
    blocks of their common leading hash ids and differ after them, a shorter one being a prefix; too
    few ids still fill the length; in a generated trace a parent's whole prompt is a prefix of its
    follow-up's."""
    a = trace.build_prompt([7, 8, 9], 40, 500)
    b = trace.build_prompt([7, 8, 10, 11], 60, 500)
    assert len(a) == 40 and len(b) == 60 and all(0 <= t < 500 for t in a + b)
    assert a[:32] == b[:32] and a[32:40] != b[32:40]
    assert trace.build_prompt([7], 16, 500) == a[:16]
    assert len(trace.build_prompt([1], 50, 500)) == 50  # too few ids: filled deterministically
    # in a generated trace, a parent's whole prompt is a prefix of its follow-up's prompt
    rows = {r["chat_id"]: r for r in trace.generate(200, rate=10, seed=3)}
    child = next(r for r in rows.values() if r["turn"] > 1)
    parent = rows[child["parent_chat_id"]]
    p = trace.build_prompt(parent["hash_ids"], parent["input_length"], 1000)
    c = trace.build_prompt(child["hash_ids"], child["input_length"], 1000)
    assert c[: len(p)] == p


def test_percentile_matches_linear_interpolation() -> None:
    """percentile interpolates linearly between ranks (50.5, 90.1 and 99.01 for 1..100), takes
    unsorted input and a single value, and is NaN for no values; poisson_times at an infinite rate
    are all 0."""
    xs = [float(x) for x in range(1, 101)]
    assert serving.percentile(xs, 50) == pytest.approx(50.5)
    assert serving.percentile(xs, 90) == pytest.approx(90.1)
    assert serving.percentile(xs, 99) == pytest.approx(99.01)
    assert serving.percentile([3.0, 1.0, 2.0], 100) == 3.0 and serving.percentile([5.0], 99) == 5.0
    assert math.isnan(serving.percentile([], 50))
    assert trace.poisson_times(3, math.inf) == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- client vs a fake server


class FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["max_tokens"]
        if body["prompt"] == [] or n == 999:
            self.send_response(400)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(obj: Any) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        for i in range(n):
            time.sleep(0.002)
            event(
                {
                    "choices": [
                        {"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}
                    ]
                }
            )
        event(
            {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}}
        )
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


def check_report(report: dict[str, Any], n: int, requested: list[int] | None = None) -> None:
    s = report["summary"]
    assert s["completed"] == n and s["failed"] == 0, s["errors"]
    for name in ("ttft", "itl", "e2e"):
        assert s[f"p50_{name}_ms"] <= s[f"p90_{name}_ms"] <= s[f"p99_{name}_ms"]
    assert s["p99_ttft_ms"] <= s["p99_e2e_ms"]
    reqs = report["requests"]
    assert len(reqs) == n and all(r["ok"] for r in reqs)
    for r in reqs:
        assert 0 < r["ttft"] <= r["e2e"]
        assert r["output_tokens"] == r["requested"]
        assert r["itl_count"] == r["chunks"] - 1
    if requested is not None:
        assert [r["requested"] for r in reqs] == requested
    assert s["total_output_tokens"] == sum(r["requested"] for r in reqs)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])


def test_bench_serving_against_fake_server(tmp_path: Path) -> None:
    """Against a fake streaming server, bench_serving (25 trace requests) and bench_simple (6)
    report every request completed with its requested output tokens, ordered percentiles, TTFT <=
    E2E, one inter-token latency per chunk after the first and throughput = tokens / duration; a
    request answered with HTTP 400 is counted as failed with its error, not raised."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = tmp_path / "t.jsonl"
        rows = trace.generate(
            30, rate=200, seed=0, max_output=12, max_input=64, system_prompt_len=32
        )
        trace.save(rows, path)
        out = tmp_path / "r.json"
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        serving.main(
            [
                "--base-url",
                url,
                "--model",
                "m",
                "--trace",
                str(path),
                "-n",
                "25",
                "--json",
                str(out),
                "--max-concurrency",
                "8",
            ]
        )
        report = json.loads(out.read_text())
        check_report(report, 25, [r["output_length"] for r in rows[:25]])
        assert report["config"]["n"] == 25 and report["config"]["model"] == "m"
        simple = load("online/bench_simple.py")
        out2 = tmp_path / "s.json"
        simple.main(
            [
                "--base-url",
                url,
                "--model",
                "m",
                "-n",
                "6",
                "--input-len",
                "40",
                "--output-len",
                "5",
                "--shared-prefix",
                "20",
                "--json",
                str(out2),
            ]
        )
        check_report(json.loads(out2.read_text()), 6, [5] * 6)
        # a failing request is counted, not raised
        bad = serving.Spec([1, 2], 2, 999)
        results, _ = serving.asyncio.run(serving.run(url, "m", [bad, serving.Spec([1], 1, 3)]))
        s = serving.summarize(results, 1.0)
        assert (s["completed"], s["failed"]) == (1, 1) and "HTTP 400" in s["errors"][0]
    finally:
        server.shutdown()


# ---------------------------------------------------------------- plots


def test_plot_two_results(tmp_path: Path) -> None:
    """plot.py writes a PNG of two labelled online series over three rates, and an offline plot of
    two result files (one with a log line before its JSON) under the given labels."""
    plot = load("plot.py")
    files = []
    for label, scale in (("radix", 1.0), ("naive", 1.5)):
        for rate in (1.0, 2.0, 4.0):
            summary = {"output_throughput": 100 * rate / scale}
            for k in ("ttft", "itl", "e2e"):
                summary.update({f"p50_{k}_ms": 10 * rate * scale, f"p99_{k}_ms": 30 * rate * scale})
            f = tmp_path / f"{label}_{rate}.json"
            f.write_text(json.dumps({"config": {"label": label, "rate": rate}, "summary": summary}))
            files.append(str(f))
    out = tmp_path / "assets" / "online.png"
    plot.main([*files, "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    off = [tmp_path / "a.json", tmp_path / "b.json"]
    off[0].write_text("log line\n" + json.dumps({"median_tok_s": 1000.0}))
    off[1].write_text(json.dumps({"median_tok_s": 1200.0}))
    out2 = tmp_path / "offline.png"
    plot.main([str(off[0]), str(off[1]), "-o", str(out2), "--label", "ref", "--label", "ours"])
    assert out2.stat().st_size > 1000


# ---------------------------------------------------------------- against the engine


def test_offline_bench_smoke_cpu(small_llama_dir: str) -> None:
    """The offline benchmark on CPU with 2 repeats reports, for each run, the workload's total
    output tokens and tok_s = tokens / seconds, a median between the runs' lowest and highest, and
    device "cpu"."""
    cmd = [
        PY,
        str(BENCH / "offline/bench.py"),
        "--model",
        small_llama_dir,
        "--device",
        "cpu",
        "--num-reqs",
        "4",
        "--min-in",
        "5",
        "--max-in",
        "20",
        "--min-out",
        "4",
        "--max-out",
        "8",
        "--max-token-id",
        "500",
        "--repeats",
        "2",
        "--json",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    _, outs = offline.make_workload(4, 5, 20, 4, 8, 0, 500)
    assert res["total_output_tokens"] == sum(outs) and len(res["runs"]) == 2
    for r in res["runs"]:
        assert r["output_tokens"] == sum(outs) and r["seconds"] > 0
        assert r["tok_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
    assert (
        min(r["tok_s"] for r in res["runs"])
        <= res["median_tok_s"]
        <= max(r["tok_s"] for r in res["runs"])
    )
    assert res["device"] == "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_serving_against_cpu_server(tmp_path: Path, small_llama_dir: str) -> None:
    """bench_serving against a live CPU minisgl server on a generated 20-request trace with
    follow-ups completes every request with its requested output tokens, and its input token total
    is the trace's."""
    import httpx

    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [PY, "-m", "minisgl", "--model", small_llama_dir, "--device", "cpu", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 60
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {server.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server not healthy within 60 s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        path = tmp_path / "trace.jsonl"
        gen = [
            PY,
            str(BENCH / "online/trace.py"),
            "generate",
            "-o",
            str(path),
            "-n",
            "20",
            "--rate",
            "20",
            "--input-mean",
            "40",
            "--max-input",
            "120",
            "--output-mean",
            "12",
            "--max-output",
            "24",
            "--system-prompt-len",
            "32",
            "--followup-prob",
            "0.4",
            "--max-context",
            "400",
        ]
        subprocess.run(gen, check=True, capture_output=True, timeout=60)
        out = tmp_path / "r.json"
        cmd = [
            PY,
            str(BENCH / "online/bench_serving.py"),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--trace",
            str(path),
            "-n",
            "20",
            "--vocab-size",
            "500",
            "--json",
            str(out),
            "--timeout",
            "120",
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        report = json.loads(out.read_text())
        rows = trace.load(path)
        check_report(report, 20, [r["output_length"] for r in rows])
        assert report["summary"]["total_input_tokens"] == sum(r["input_length"] for r in rows)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
