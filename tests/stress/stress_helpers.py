"""Helpers shared by the stress suite (issue 9): real `python -m minisgl` servers on CPU with
conftest's `small_llama_dir` (stories260K's shape, random weights), /metrics parsing and OpenAI
error-shape checks."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from procs import alive, comm, descendants, free_port  # noqa: E402,F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time"


class Server:
    def __init__(self, tmp: Path, model: str, *flags: str, host: str | None = None) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "minisgl", "--model", model, "--device", "cpu"]
        cmd += ["--dtype", "float32", "--port", str(self.port), *flags]
        if host:
            cmd += ["--host", host]
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=REPO
        )
        self.all_pids: set[int] = set()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")
        self.all_pids = descendants(self.proc.pid)

    def worker_pid(self, name: str) -> int:
        """pid of a worker by its process name (/proc/PID/comm), e.g. minisgl:sched0."""
        for pid in descendants(self.proc.pid):
            if comm(pid) == name:
                return pid
        raise AssertionError(f"no worker named {name}: {[comm(p) for p in self.all_pids]}")

    def socket_dir(self) -> Path:
        """The private ZMQ socket directory (the launcher logs it at start)."""
        m = re.search(r"sockets in (\S+)\)", self.log.read_text())
        assert m, self.log.read_text()[-2000:]
        return Path(m.group(1))

    def rss_mb(self, pid: int | None = None) -> float:
        """Resident memory of one process (default: the launcher, i.e. the API server)."""
        with open(f"/proc/{pid or self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        out = {}
        for m in re.finditer(r"^(minisgl_[a-z_]+) (\S+)$", text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in descendants(self.proc.pid) | self.all_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def start_server(tmp_path_factory, model: str, *flags: str, host: str | None = None) -> Server:
    s = Server(tmp_path_factory.mktemp("srv"), model, *flags, host=host)
    try:
        s.wait_ready()
        # the KV gauges appear with the scheduler's first Stats message (every 0.5 s)
        deadline = time.monotonic() + 10
        while "minisgl_kv_pages_used" not in s.metrics() and time.monotonic() < deadline:
            time.sleep(0.1)
    except BaseException:
        s.stop()
        raise
    return s


def http_raw(url: str, data: bytes, rcvbuf: int = 0) -> socket.socket:
    """A raw TCP connection to the server of `url` that has sent `data` (and reads nothing)."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    s.sendall(data)
    return s


def post_bytes(path: str, body: dict, extra: str = "") -> bytes:
    raw = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(raw)}\r\n{extra}\r\n").encode() + raw


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def busy_pages(m: dict[str, float]) -> float:
    """KV pages held by requests (pages held only by the prefix cache are reusable)."""
    return m["minisgl_kv_pages_used"] - m["minisgl_kv_pages_cached"]


def wait_idle(server: Server, idle_busy: float, within: float) -> tuple[float, dict]:
    """Poll /metrics until no request runs and busy pages are back to idle; returns (s, metrics)."""
    t0 = time.monotonic()
    while True:
        m = server.metrics()
        ok = (
            m.get("minisgl_num_running_reqs") == 0
            and m.get("minisgl_num_waiting_reqs", 0) == 0
            and m.get("minisgl_api_inflight_requests", 0) == 0
            and busy_pages(m) == idle_busy
        )
        if ok or time.monotonic() - t0 > within:
            return time.monotonic() - t0, m
        time.sleep(0.05)


def shaped_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_llama_dir):
    """One server per test module (imported by the modules that use it: a conftest.py here
    would shadow tests/conftest.py for `from conftest import ...`)."""
    s = start_server(tmp_path_factory, small_llama_dir, "--max-request-bytes", "1000000")
    yield s
    s.stop()
