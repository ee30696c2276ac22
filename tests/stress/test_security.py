"""Security defaults: binds 127.0.0.1 unless --host says otherwise; --api-key enforced on every
/v1 route and /generate; body size and n capped; the `model` field never reaches the
filesystem."""

from __future__ import annotations

import os
import socket

import httpx
import pytest
from stress_helpers import PROMPT, shaped_error, start_server

KEY = "s3cret-key"
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory, small_llama_dir):
    tmpl = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
    tmpl.write_text(TEMPLATE)
    s = start_server(
        tmp_path_factory, small_llama_dir, "--api-key", KEY, "--max-request-bytes", "100000", "--max-n", "4",
        "--served-model-name", "stories", "--chat-template", str(tmpl),
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
