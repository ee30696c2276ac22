"""Security defaults: binds 127.0.0.1 unless --host says otherwise; the API key (here from
--api-key-file, never on the command line nor in a log) enforced on every /v1 route and
/generate; body size and n capped; the `model` field never reaches the filesystem; Host, Origin
and Content-Type checked; a looping chat template fails the request, not the tokenizer;
`--tp 2` listens on loopback only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from stress_helpers import PROMPT, alive, comm, descendants, shaped_error, start_server

from minisgl.args import parse_args

KEY = "s3cret-key"
# a template that never ends for one message ("loop"): 10^10 iterations in Jinja's sandbox
TEMPLATE = (
    "{% if messages[0]['content'] == 'loop' %}{% for a in range(100000) %}{% for b in "
    "range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, small_llama_dir):
    d = tmp_path_factory.mktemp("tmpl")
    (d / "chat.jinja").write_text(TEMPLATE)
    (d / "key").write_text(KEY + "\n")
    s = start_server(
        tmp_path_factory, small_llama_dir, "--api-key-file", str(d / "key"), "--max-request-bytes", "100000",
        "--max-n", "4", "--served-model-name", "stories", "--chat-template", str(d / "chat.jinja"),
        "--log-level", "debug", "--allowed-origins", "http://app.example",
    )  # fmt: skip
    yield s
    s.stop()


def listening_addrs(port: int) -> list[str]:
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].split(":")
            if int(p, 16) == port and f[3] == "0A":  # LISTEN
                if len(addr) == 8:
                    out.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    out.append("ipv6:" + addr)
    return out


def outward_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.connect(("10.255.255.255", 1))  # no packet is sent
            ip = u.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_binds_loopback_by_default(secured):
    """Without --host the server listens on 127.0.0.1 only: a connection to the machine's
    non-loopback address (where it has one) is refused, and the log names 127.0.0.1."""
    addrs = listening_addrs(secured.port)
    assert addrs == ["127.0.0.1"], addrs
    ip = outward_ip()
    refused = None
    if ip:
        with pytest.raises(OSError), socket.create_connection((ip, secured.port), timeout=2):
            pass
        refused = ip
    assert "127.0.0.1" in secured.log.read_text()
    print(
        f"\nSECURITY bind: listening on {addrs}; connect via {refused or 'no non-loopback IP'} refused"
    )


ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}),
]  # fmt: skip


def test_api_key_every_route(secured):
    """On every /v1 route and /generate, a missing, wrong, empty, unprefixed, Basic or altered key
    is a 401 with an OpenAI-shaped error and the right Bearer key is served; /health and /metrics
    need no key."""
    n = 0
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        for method, path, body in ROUTES:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"},
                            {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": f"Bearer {KEY}x"}]:  # fmt: skip
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                shaped_error(r)
                n += 1
            r = c.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, (path, r.text)
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    print(f"\nSECURITY api-key: {n} unauthenticated requests on {len(ROUTES)} routes -> 401")


def test_body_and_n_caps(secured):
    """A 150 kB body over --max-request-bytes 100000 is a 413 naming the cap; n=5 or n=10000 over
    --max-n 4 is a 400 with param "n"; n=4 gives 4 choices."""
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=secured.url, timeout=30, headers=h) as c:
        big = b'{"prompt": "' + b"a" * 150_000 + b'"}'
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "100000" in shaped_error(r)["message"]
        for n in (5, 10_000):
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": n})
            assert r.status_code == 400 and shaped_error(r)["param"] == "n", r.text
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 4})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
    print(
        "\nSECURITY caps: 150 kB body -> 413 (cap 100000; default 8388608); n=5, 10000 -> 400 (max-n 4)"
    )


def test_model_field_never_a_path(secured, tmp_path):
    """Path-like model names (relative, absolute, the model's own directory, a FIFO, a ../ detour)
    are a 400 with param "model" on completions and chat, the FIFO is never read, and the served
    name "stories" is accepted."""
    fifo = tmp_path / "trap"
    os.mkfifo(fifo)  # opening it for reading would block: a hang means the server touched it
    names = ["../../etc/passwd", "/etc/passwd", secured.model, str(fifo), "stories/../stories"]
    with httpx.Client(base_url=secured.url, timeout=10) as c:
        h = {"Authorization": f"Bearer {KEY}"}
        for m in names:
            for path, body in [("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:  # fmt: skip
                r = c.post(path, json={**body, "model": m}, headers=h)
                assert r.status_code == 400, (m, r.text)
                assert shaped_error(r)["param"] == "model"
        r = c.post(
            "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 2, "model": "stories"},
            headers=h,
        )
        assert r.status_code == 200
    st = os.stat(fifo)
    assert st.st_atime == st.st_mtime  # never opened/read
    print(
        f"\nSECURITY model: {len(names) * 2} path-like model names -> 400 (unknown model), fifo untouched"
    )


# ---- issue 17: items 7, 8, 10, 11 ---------------------------------------------------------------
def test_api_key_never_visible(secured, monkeypatch, tmp_path, small_llama_dir):
    """The key (from --api-key-file) is in no process's command line and not in the debug log;
    MINISGL_API_KEY works too; a bad key file fails at start with one line."""
    pids = {secured.proc.pid} | descendants(secured.proc.pid)
    for p in pids:
        with open(f"/proc/{p}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read(), comm(p)
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert KEY not in secured.log.read_text()
    monkeypatch.setenv("MINISGL_API_KEY", "from-env")
    args = parse_args(["--model", "m"])
    assert args.api_key == "from-env" and "from-env" not in repr(args)
    (tmp_path / "k").write_text("from-file\n")
    assert (
        parse_args(["--model", "m", "--api-key-file", str(tmp_path / "k")]).api_key == "from-file"
    )
    for argv, msg in [(["--api-key-file", "/no/such/key"], "No such file"),
                      (["--api-key-file", str(tmp_path / "k"), "--api-key", "x"], "not both")]:  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "minisgl", "--model", small_llama_dir, *argv],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    print(f"\nSECURITY key: not in the cmdline of {len(pids)} processes nor in the debug log")


def test_host_origin_content_type(secured):
    """DNS rebinding (a foreign Host), cross-site requests (a foreign Origin, a text/plain body a
    browser sends without a preflight): refused before anything runs."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = b'{"prompt": "Once upon a time", "max_tokens": 4}'
    with httpx.Client(base_url=secured.url, timeout=30, headers=auth) as c:
        gen0 = secured.metrics().get("minisgl_generation_tokens_total", 0)
        for host, ok in [("evil.example", False), (f"evil.example:{secured.port}", False),
                         (f"localhost:{secured.port}", True), ("127.0.0.1", True), ("[::1]:1", True)]:  # fmt: skip
            r = c.get("/v1/models", headers={"Host": host})
            assert r.status_code == (200 if ok else 400), (host, r.text)
        for origin, ok in [("http://evil.example", False), ("http://localhost:3000", False),
                           ("null", False), ("http://app.example", True)]:  # fmt: skip
            r = c.get("/v1/models", headers={"Origin": origin})
            assert r.status_code == (200 if ok else 403), (origin, r.text)
        for ctype in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            None,
        ]:
            h = {"content-type": ctype} if ctype else {}
            r = c.post(
                "/v1/completions", content=body, headers={**h, "Origin": "http://app.example"}
            )
            assert r.status_code == 415 and shaped_error(r)
        r = c.post(
            "/v1/completions",
            content=body,
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert r.status_code == 200, r.text
        assert secured.metrics()["minisgl_generation_tokens_total"] - gen0 == 4
    print(
        "\nSECURITY host/origin: foreign Host -> 400, foreign Origin -> 403, non-JSON body -> 415"
    )


def test_looping_chat_template(secured):
    """A template that never finishes: that request fails after the render time limit, the
    tokenizer lives on and serves the next chat."""
    tok = secured.worker_pid("minisgl:tok0")
    with httpx.Client(
        base_url=secured.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    ) as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "loop"}]})
        took = time.monotonic() - t0
        assert r.status_code == 500 and "did not finish rendering" in shaped_error(r)["message"]
        r = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        assert alive(tok) and c.get("/health").status_code == 200
    print(
        f"\nSECURITY template: looping template -> 500 after {took:.1f} s; tokenizer alive, next chat 200"
    )


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for p in pids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                link = os.readlink(f"/proc/{p}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for ln in open(table).read().splitlines()[1:]:
            f = ln.split()
            if f[3] == "0A" and f[9] in inodes:
                addr, port = f[1].split(":")
                ip = socket.inet_ntop(socket.AF_INET if len(addr) == 8 else socket.AF_INET6,
                                      b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8)))  # fmt: skip
                out.append(f"{ip}:{int(port, 16)}")
    return out


def test_tp2_listens_on_loopback_only(tmp_path_factory, small_llama_dir):
    """A tp=2 server serves a completion, and every TCP socket its processes listen on (at least
    two) is on a loopback address."""
    s = start_server(tmp_path_factory, small_llama_dir, "--tp", "2")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
            assert r.status_code == 200, r.text
        addrs = _listening({s.proc.pid} | descendants(s.proc.pid))
        assert len(addrs) >= 2 and all(a.startswith(("127.", "::1:")) for a in addrs), addrs
    finally:
        s.stop()
    print(f"\nSECURITY tp2: {len(addrs)} listening sockets, all loopback: {sorted(addrs)}")
