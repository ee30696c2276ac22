"""Hostile input: hundreds of malformed or abusive requests, hand-written and generated with
hypothesis, each get a 4xx with an OpenAI-shaped error (never a 5xx, never a hang), and the
server still serves a normal request afterwards. The server here runs with
--max-request-bytes 1000000 (the default cap is 8 MiB = 8388608 bytes)."""

from __future__ import annotations

import json
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stress_helpers import PROMPT, server, shaped_error  # noqa: F401 (fixture)

TIMEOUT = 20.0  # per request: a hang fails the test
COMP, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
MSGS = [{"role": "user", "content": "hi"}]


def fixed_cases() -> list[tuple[str, str, str, bytes | object, dict]]:
    """(kind, path, method, body (bytes = raw, else JSON), headers)."""
    J = {"content-type": "application/json"}
    c: list = []
    add = c.append
    # wrong types
    for field, v in [("prompt", 123), ("prompt", {"a": 1}), ("prompt", True), ("max_tokens", "5"),
                     ("max_tokens", 1.5), ("temperature", "hot"), ("top_p", [1]), ("n", "2"),
                     ("stream", "yes"), ("stop", 5), ("seed", "x"), ("logprobs", "many"),
                     ("top_k", 2.5), ("ignore_eos", "no"), ("stop_token_ids", "1")]:  # fmt: skip
        add(("wrong type", COMP, "POST", {"prompt": PROMPT, "max_tokens": 4, field: v}, {}))
    for v in [5, "hello", [1, 2], [{"content": "no role"}], [{"role": "user", "content": 7}]]:
        add(("wrong type", CHAT, "POST", {"messages": v}, {}))
    # huge numbers / negative values
    for field, v in [("max_tokens", 10**30), ("max_tokens", 2**63), ("seed", 2**70),
                     ("temperature", 1e308), ("top_k", 10**20), ("logprobs", 10**9),
                     ("n", 2**40)]:  # fmt: skip
        add(("huge number", COMP, "POST", {"prompt": PROMPT, field: v}, {}))
    for field, v in [("max_tokens", -1), ("max_tokens", 0), ("temperature", -0.5), ("top_p", -1),
                     ("top_k", -3), ("n", -1), ("logprobs", -1), ("n", 0)]:  # fmt: skip
        add(("negative/zero", COMP, "POST", {"prompt": PROMPT, field: v}, {}))
    # NaN / Infinity in JSON
    for field in ["temperature", "top_p", "max_tokens", "seed", "n"]:
        for lit in ["NaN", "Infinity", "-Infinity"]:
            raw = f'{{"prompt": "hi", "{field}": {lit}}}'.encode()
            add(("NaN/Infinity", COMP, "POST", raw, J))
    # invalid UTF-8 and malformed JSON bodies
    for raw in [b"\xff\xfe\x00garbage", b'{"prompt": "\xc3\x28"}', b'{"prompt": "\xed\xa0\x80"}',
                b"{not json", b"", b"[1, 2]", b"null", b'"str"', b'{"prompt": "hi"']:  # fmt: skip
        add(("invalid UTF-8/JSON", COMP, "POST", raw, J))
        add(("invalid UTF-8/JSON", CHAT, "POST", raw, J))
    # a body over the cap (1 MB here) and a 100k-token prompt (under the cap)
    add(("body over cap", COMP, "POST", b'{"prompt": "' + b"a" * 2_000_000 + b'"}', J))
    add(("body over cap", CHAT, "POST", b"x" * 2_000_000, J))
    add(("100k-token prompt", COMP, "POST", {"prompt": "hi " * 100_000, "max_tokens": 4}, {}))
    add(("100k-token prompt", COMP, "POST", {"prompt": [5] * 100_000, "max_tokens": 4}, {}))
    # unknown fields
    for f in ["bogus", "__proto__", "functions", "prompt ", "PROMPT"]:
        add(("unknown field", COMP, "POST", {"prompt": PROMPT, f: 1}, {}))
        add(("unknown field", CHAT, "POST", {"messages": MSGS, f: 1}, {}))
    # n = 10000
    add(("n=10000", COMP, "POST", {"prompt": PROMPT, "n": 10000}, {}))
    add(("n=10000", CHAT, "POST", {"messages": MSGS, "n": 10000}, {}))
    add(("n=10000", GEN, "POST", {"text": PROMPT, "sampling_params": {"n": 10000}}, {}))
    # token ids out of range
    for ids in [[1, 99999], [-1], [1, 2**40], [[1, 5], [512]]]:
        add(("token id out of range", COMP, "POST", {"prompt": ids, "max_tokens": 4}, {}))
    add(("token id out of range", GEN, "POST", {"input_ids": [1, 4096]}, {}))
    add(("token id out of range", COMP, "POST", {"prompt": "a", "stop_token_ids": [10**6]}, {}))
    # missing fields
    add(("missing field", COMP, "POST", {"max_tokens": 4}, {}))
    add(("missing field", COMP, "POST", {}, {}))
    add(("missing field", CHAT, "POST", {"max_tokens": 4}, {}))
    add(("missing field", GEN, "POST", {"sampling_params": {}}, {}))
    # wrong content-type (a form body is not JSON)
    for ct in ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]:
        add(("wrong content-type", COMP, "POST", b"prompt=hi&max_tokens=4", {"content-type": ct}))
    # deeply nested JSON
    for depth in [1_000, 100_000]:
        raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        add(("deeply nested JSON", COMP, "POST", raw, J))
        add(
            (
                "deeply nested JSON",
                CHAT,
                "POST",
                b'{"messages": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
                J,
            )
        )
    # model names that look like paths
    for m in ["../../etc/passwd", "/etc/passwd", "gpt-4", "", "stories260K/../../x"]:
        add(("unknown model", COMP, "POST", {"prompt": PROMPT, "model": m}, {}))
    # wrong routes / methods
    add(("bad route/method", "/v1/nothing", "POST", {}, {}))
    add(("bad route/method", COMP, "GET", None, {}))
    add(("bad route/method", "/v1/models", "DELETE", None, {}))
    return c


# ---- generated cases: a wrong-typed or out-of-range JSON value for one field ---------------------
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VAL = st.recursive(
    JSON_LEAF,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=5), ch, max_size=4),
    max_leaves=10,
)
NOT_NUMBER = (
    st.text() | st.lists(JSON_VAL, max_size=3) | st.dictionaries(st.text(), JSON_VAL, max_size=3)
)
NOT_INT = NOT_NUMBER | st.floats(allow_nan=False).filter(lambda x: not float(x).is_integer())
NOT_BOOL = st.integers() | NOT_NUMBER.filter(lambda v: v != [] and v != {} and v != "")
NOT_STR = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.dictionaries(st.text(), JSON_VAL, min_size=1, max_size=3)  # fmt: skip

COMPLETION_FIELDS = {
    "prompt": NOT_STR.filter(lambda v: not isinstance(v, list)),
    "max_tokens": NOT_INT | st.integers(max_value=0) | st.integers(min_value=10**4),
    "temperature": NOT_NUMBER | st.floats(max_value=-1e-9) | st.floats(min_value=101, allow_infinity=False),
    "top_p": NOT_NUMBER | st.floats(max_value=0) | st.floats(min_value=1.0001, allow_infinity=False),
    "top_k": NOT_INT | st.integers(max_value=-2),
    "n": NOT_INT | st.integers(max_value=0) | st.integers(min_value=17),
    "seed": NOT_INT | st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1),
    "stream": NOT_BOOL,
    "ignore_eos": NOT_BOOL,
    "logprobs": NOT_INT | st.integers(min_value=21) | st.integers(max_value=-1),
    "stop_token_ids": st.lists(st.integers(min_value=512) | st.integers(max_value=-1), min_size=1, max_size=3) | NOT_INT.filter(lambda v: not isinstance(v, list)),
    "model": NOT_STR | st.text(min_size=1).filter(lambda s: s != "stories260K"),
    "frequency_penalty": st.floats(min_value=2.01, max_value=1e6) | st.text(),
    "presence_penalty": st.floats(max_value=-2.01, min_value=-1e6) | st.text(),
    "repetition_penalty": st.floats(max_value=0) | st.floats(min_value=2.01, allow_infinity=False),
    "min_p": st.floats(max_value=-1e-9) | st.floats(min_value=1.0001, allow_infinity=False),
    "logit_bias": st.dictionaries(st.text(min_size=1).filter(lambda k: not k.isdigit()), st.floats(-1, 1), min_size=1) | st.integers() | st.text(),
    "response_format": st.integers() | st.text() | st.just({"type": "json_schema"}) | st.just({"type": "xml"}),
}  # fmt: skip
CHAT_FIELDS = {
    "messages": NOT_STR
    | st.just([])
    | st.lists(st.dictionaries(st.sampled_from(["content", "x"]), JSON_VAL, max_size=2), min_size=1, max_size=3),
    "max_completion_tokens": NOT_INT | st.integers(max_value=0),
    "top_logprobs": NOT_INT | st.integers(min_value=21),
    "temperature": COMPLETION_FIELDS["temperature"],
    "n": COMPLETION_FIELDS["n"],
    "model": COMPLETION_FIELDS["model"],
}  # fmt: skip


@st.composite
def generated(draw):
    path = draw(st.sampled_from([COMP, CHAT]))
    fields = COMPLETION_FIELDS if path == COMP else CHAT_FIELDS
    body = (
        {"prompt": PROMPT, "max_tokens": 4} if path == COMP else {"messages": MSGS, "max_tokens": 4}
    )
    field = draw(st.sampled_from(sorted(fields)))
    body[field] = draw(fields[field])
    if draw(st.booleans()):  # sometimes also an unknown field
        body[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in fields and k not in body))] = draw(JSON_VAL)  # fmt: skip
    return path, field, body


def send(c: httpx.Client, path: str, method: str, body, headers: dict) -> httpx.Response:
    if isinstance(body, bytes):
        return c.request(method, path, content=body, headers=headers)
    if body is None:
        return c.request(method, path, headers=headers)
    return c.request(method, path, json=body, headers=headers)


def check(r: httpx.Response, what) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:500])
    shaped_error(r)


def test_hostile_requests(server):
    kinds: Counter = Counter()
    statuses: Counter = Counter()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        for kind, path, method, body, headers in fixed_cases():
            r = send(c, path, method, body, headers)
            check(
                r, (kind, path, body if not isinstance(body, bytes) or len(body) < 200 else "...")
            )
            kinds[kind] += 1
            statuses[r.status_code] += 1

        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(generated())
        def fuzz(case):
            path, field, body = case
            try:
                raw = json.dumps(body, allow_nan=False).encode()
            except ValueError:
                return
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            check(r, (path, body))
            kinds[f"generated:{field}"] += 1
            statuses[r.status_code] += 1

        fuzz()
        # the server still serves a normal request
        r = c.post(COMP, json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        assert c.get("/health").status_code == 200
    total = sum(kinds.values())
    assert total >= 200, total
    gen = sum(v for k, v in kinds.items() if k.startswith("generated"))
    print(f"\nHOSTILE: {total} requests ({total - gen} hand-written, {gen} generated), all 4xx")
    print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    for k, v in sorted(kinds.items()):
        print(f"  {k}: {v}")
