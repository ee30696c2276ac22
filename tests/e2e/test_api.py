"""The OpenAI API surface vLLM / SGLang users expect (issue 18), against a real server on CPU:
a tiny random Qwen3 with Qwen's real tokenizer (`qwen3_chat_dir`), `--reasoning-parser qwen3`
and CORS for one origin. Random weights say nothing useful, so outputs are shaped with the
features themselves: a grammar (`guided_regex`) makes the model write a `<think>` block or a
`<tool_call>` block, `logit_bias` forces a token, and structured outputs are valid whatever
the weights say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
import pytest
from procs import free_port
from test_server import shaped_error, sse_events

REPO = Path(__file__).resolve().parents[2]
ORIGIN = "http://ui.test"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
CALL = '<tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "Oslo"\\}\\}\\n</tool_call>'
USER = [{"role": "user", "content": "Wetter in Oslo? 日本語 🎉"}]


@pytest.fixture(scope="module")
def server(qwen3_chat_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "server.log"
    cmd = [sys.executable, "-m", "minisgl", "--model", qwen3_chat_dir, "--device", "cpu",
           "--dtype", "float32", "--port", str(port), "--reasoning-parser", "qwen3",
           "--allowed-origins", ORIGIN, "--served-model-name", "qwen-tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tok(qwen3_chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_chat_dir)


def chat(client, status: int = 200, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, **body})
    assert r.status_code == status, r.text
    return r.json()


def stream(client, path: str = "/v1/chat/completions", **body) -> list:
    body = {"messages": USER, "max_tokens": 8, **body, "stream": True}
    if path == "/v1/completions":
        body.pop("messages")
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r.iter_lines())


def merged(events: list) -> dict:
    """A chat stream's deltas put together, as the openai client does."""
    out = {"content": "", "reasoning_content": "", "tool_calls": {}, "finish": None}
    for e in events[:-1]:
        for c in e["choices"]:
            d = c["delta"]
            out["content"] += d.get("content") or ""
            out["reasoning_content"] += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls", []):
                acc = out["tool_calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                acc["id"] = tc.get("id", acc.get("id"))
                acc["name"] += tc.get("function", {}).get("name", "")
                acc["arguments"] += tc.get("function", {}).get("arguments", "")
            out["finish"] = c["finish_reason"] or out["finish"]
    return out


# ---- fields real clients send -------------------------------------------------------------------
def test_accepted_and_rejected_fields(client):
    """A chat request with the fields real clients send (store, metadata, service_tier, user,
    SGLang's extras at their defaults, penalties, min_p, min_tokens, logit_bias) is served;
    unsupported values, out-of-range sampling values, fields missing what they depend on
    (top_logprobs without logprobs, stream_options without stream, tool_choice without tools), an
    unknown tool, a bad schema or regex and two guided constraints at once each get an OpenAI-shaped
    400 naming the field."""
    ok = dict(store=False, metadata={"k": "v"}, service_tier="auto", parallel_tool_calls=True,
              user="u", no_stop_trim=False, skip_special_tokens=True, return_hidden_states=False,
              presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.05,
              min_tokens=2, logit_bias={"100": 1.5})  # fmt: skip
    assert chat(client, **ok)["choices"][0]["finish_reason"] == "length"
    for body, needle in [
        (dict(return_hidden_states=True), "return_hidden_states"),
        (dict(no_stop_trim=True), "no_stop_trim"),
        (dict(skip_special_tokens=False), "skip_special_tokens"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(logit_bias={"999999": 1}), "logit_bias"),
        (dict(logit_bias={"1": 300}), "logit_bias"),
        (dict(min_tokens=20), "min_tokens"),
        (dict(top_logprobs=2), "logprobs"),
        (dict(stream_options={"include_usage": True}), "stream"),
        (dict(tool_choice="auto"), "tools"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
        (dict(chat_template_kwargs={"tokenize": True}), "chat_template_kwargs"),
        (dict(response_format={"type": "json_schema"}), "json_schema"),
        (
            dict(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "bogus"}},
                }
            ),
            "bogus",
        ),  # fmt: skip
        (dict(guided_regex="(unclosed"), "regex"),
        (dict(guided_regex="a", guided_choice=["b"]), "at most one"),
    ]:
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, **body})
        err = shaped_error(r, 400)
        assert needle in err["message"], (body, err)


# ---- routes and headers -------------------------------------------------------------------------
def test_models_tokenize_detokenize(client, tok):
    """/v1/models lists the served name (and /v1/models/<name> the same entry, another name 404);
    /tokenize returns the tokenizer's ids, count, token strings and max_model_len 1024, special
    tokens included, /detokenize gives the text back, and /tokenize of messages renders the chat
    template with chat_template_kwargs; an id outside the vocabulary or an empty body is a 400."""
    m = client.get("/v1/models").json()["data"][0]
    assert m["id"] == "qwen-tiny" and abs(m["created"] - time.time()) < 3600
    assert client.get("/v1/models/qwen-tiny").json() == m
    shaped_error(client.get("/v1/models/other"), 404)
    text = "héllo wörld 日本語 🎉 <think>x</think> <|im_end|>"
    r = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    ids = tok.encode(text)
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 1024
    assert tok.convert_tokens_to_ids(["<think>", "<|im_end|>"])[0] in ids
    assert r["token_strs"] == tok.convert_ids_to_tokens(ids)
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}
    kw = {"enable_thinking": False}
    r = client.post("/tokenize", json={"messages": USER, "chat_template_kwargs": kw}).json()
    rendered = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, **kw)
    assert rendered.endswith("<think>\n\n</think>\n\n")
    assert r["tokens"] == tok.encode(rendered, add_special_tokens=False)
    shaped_error(client.post("/detokenize", json={"tokens": [10**6]}), 400)
    shaped_error(client.post("/tokenize", json={}), 400)


def test_request_id_cors_fingerprint(client):
    """An X-Request-Id is echoed back (a 32-hex id is made up otherwise); the allowed origin gets
    the CORS header on responses and preflights, another origin none; system_fingerprint looks like
    fp_ + 10 hex digits and is the same in every chunk of a stream."""
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                    headers={"X-Request-Id": "req-42", "Origin": ORIGIN})  # fmt: skip
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert re.fullmatch(r"fp_[0-9a-f]{10}", r.json()["system_fingerprint"])
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/health").headers["x-request-id"])
    pre = client.options("/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    other = client.options("/v1/chat/completions", headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert "access-control-allow-origin" not in other.headers
    for e in stream(client)[:-1]:
        assert e["system_fingerprint"] == r.json()["system_fingerprint"]


def test_continuous_usage_stats(client):
    """With continuous_usage_stats every chunk of a stream carries usage: completion_tokens never
    decrease and reach 6, the final usage chunk's count, and prompt_tokens are the final chunk's."""
    events = stream(client, max_tokens=6,
                    stream_options={"include_usage": True, "continuous_usage_stats": True})  # fmt: skip
    chunks, last = events[:-2], events[-2]
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert done == sorted(done) and done[-1] == 6 and last["usage"]["completion_tokens"] == 6
    assert all(c["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for c in chunks)


# ---- logprobs and finish accounting ----------------------------------------------------------
def test_logprobs_follow_the_text(client, tok):
    """Each token's top_logprobs holds the sampled token and at most logprobs + 1 entries; when EOS
    ends a completion after 3 tokens it has no logprob entry, the 3 entries join to the text and the
    stream gives the same ones; at a stop string the entries cover the returned text but not the
    stop string."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    body = dict(prompt="Once", max_tokens=6, temperature=0)
    for k in (0, 2):
        lp = client.post("/v1/completions", json={**body, "logprobs": k}).json()["choices"][0]
        for t, top in zip(lp["logprobs"]["tokens"], lp["logprobs"]["top_logprobs"]):
            assert t in top and len(top) <= k + 1  # the sampled token is always there
    # EOS after 3 tokens (min_tokens holds it back, logit_bias then forces it): no EOS entry
    forced = dict(body, min_tokens=3, logit_bias={str(eos): 100}, logprobs=1)
    for path in ("/v1/completions",):
        c = client.post(path, json=forced).json()["choices"][0]
        assert c["finish_reason"] == "stop" and len(c["logprobs"]["tokens"]) == 3
        assert "".join(c["logprobs"]["tokens"]) == c["text"]
        events = stream(client, path, **forced)
        toks = [
            t for e in events[:-1] for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])
        ]
        assert toks == c["logprobs"]["tokens"]
    # a stop string: its tokens' entries go with it, streamed or not
    full = client.post("/v1/completions", json={**body, "max_tokens": 12}).json()["choices"][0]
    stop = full["text"][6:9]
    c = client.post("/v1/completions", json={**body, "max_tokens": 12, "stop": stop,
                                             "logprobs": 1}).json()["choices"][0]  # fmt: skip
    assert c["finish_reason"] == "stop" and c["text"] == full["text"][: full["text"].find(stop)]
    joined = "".join(c["logprobs"]["tokens"])
    assert joined.startswith(c["text"]) and stop not in joined[len(c["text"]) - 1 :]


def test_metrics_count_stop_strings_as_stop(client):
    """A completion ended by a stop string finishes with "stop" and adds one to
    minisgl_request_finished_total{reason="stop"}."""

    def stops() -> float:
        m = re.search(r'minisgl_request_finished_total\{reason="stop"\} ([0-9.]+)',
                      client.get("/metrics").text)  # fmt: skip
        return float(m.group(1)) if m else 0.0

    full = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 10,
                                                "temperature": 0}).json()["choices"][0]["text"]  # fmt: skip
    before = stops()
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 10, "temperature": 0,
                                             "stop": full[3:6]})  # fmt: skip
    assert r.json()["choices"][0]["finish_reason"] == "stop" and stops() == before + 1


# ---- structured outputs -------------------------------------------------------------------------
def test_structured_outputs_openai_parse(server):
    """The openai client's beta parse with a pydantic response_format gets, for three seeds at
    temperature 1, content that validates as that model and equals the parsed object."""
    import openai
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: Literal["Paris", "Oslo", "Lima"]
        rainy: bool
        alerts: list[Literal["wind", "snow"]]

    cl = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    for seed in range(3):
        out = cl.beta.chat.completions.parse(model="qwen-tiny", messages=USER, response_format=Weather,
                                             max_tokens=200, seed=seed, temperature=1.0)  # fmt: skip
        msg = out.choices[0].message
        assert isinstance(msg.parsed, Weather), msg.content
        assert Weather.model_validate_json(msg.content) == msg.parsed


def test_structured_outputs_kinds(client, tok):
    """json_object (with "{" and "}" pushed) gives "{}" and stops; guided_choice always gives one of
    the choices, guided_regex text that fully matches, and a json_schema on /v1/completions a JSON
    object with exactly its one key, the same text when streamed; SGLang's regex in /generate's
    sampling_params is a 400."""
    close = tok.encode("}")[0]
    # json_object: "{" and "}" are pushed hard, and the grammar allows "{}" only, then EOS
    bias = {str(tok.encode("{")[0]): 50, str(close): 50}
    c = chat(client, max_tokens=20, response_format={"type": "json_object"}, logit_bias=bias)
    c = c["choices"][0]
    assert c["message"]["content"] == "{}" and c["finish_reason"] == "stop"
    choices = ["yes", "no", "maybe (later)"]
    for seed in range(4):
        c = chat(client, max_tokens=20, guided_choice=choices, temperature=1, seed=seed)
        assert c["choices"][0]["message"]["content"] in choices
    c = chat(client, max_tokens=30, guided_regex=r"[0-9]{3}-[a-z]{2}")["choices"][0]["message"]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c["content"])
    # completions take the same constraints; streaming keeps them too
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    body = {"prompt": "x", "max_tokens": 30, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}  # fmt: skip
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert set(json.loads(text)) == {"n"}
    events = stream(client, "/v1/completions", **body)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    r = client.post("/generate", json={"text": "x", "sampling_params": {"regex": "a"}})
    shaped_error(r, 400)  # SGLang's native extras are not implemented


# ---- tools --------------------------------------------------------------------------------------
def test_tool_choice_named_required_none(client):
    """A named tool_choice gives one call of that tool (a call_ id, arguments with an allowed city,
    content null, finish "stop"), with the same arguments streamed; "required" without parallel
    calls gives exactly one call and finish "tool_calls"; with "none" a <tool_call> the model writes
    stays in the content."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    c = chat(client, max_tokens=40, tools=TOOLS, tool_choice=named)["choices"][0]
    call = c["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
    assert c["message"]["content"] is None and c["finish_reason"] == "stop"
    s = merged(stream(client, max_tokens=40, tools=TOOLS, tool_choice=named))
    assert s["tool_calls"][0]["arguments"] == call["function"]["arguments"]
    c = chat(client, max_tokens=80, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    calls = c["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and c["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Oslo")
    c = chat(client, max_tokens=80, tools=TOOLS, tool_choice="none", guided_regex=CALL)
    assert "<tool_call>" in c["choices"][0]["message"]["content"]


def test_tool_calls_auto_hermes(client):
    """With tools given, text then two Hermes <tool_call> blocks come back as content "Let me
    check." and two tool calls (Oslo, Paris) with finish "tool_calls", streamed the same; with
    parallel_tool_calls false only one call is kept; a history holding the calls and a tool result
    renders through the chat template and can be continued."""
    regex = f"Let me check\\. {CALL}\\n{CALL.replace('Oslo', 'Paris')}"
    body = dict(max_tokens=200, tools=TOOLS, guided_regex=regex)
    msg = chat(client, **body)["choices"][0]
    assert msg["finish_reason"] == "tool_calls" and msg["message"]["content"] == "Let me check."
    calls = msg["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"},
                                                                      {"city": "Paris"}]  # fmt: skip
    s = merged(stream(client, **body))
    assert s["content"] == "Let me check." and s["finish"] == "tool_calls"
    assert [s["tool_calls"][i]["arguments"] for i in (0, 1)] == [
        c["function"]["arguments"] for c in calls]  # fmt: skip
    one = chat(client, **body, parallel_tool_calls=False)["choices"][0]["message"]["tool_calls"]
    assert len(one) == 1
    # the conversation goes on with the call and its result in the history
    history = USER + [{"role": "assistant", "content": None, "tool_calls": calls},
                      {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}]  # fmt: skip
    r = client.post("/tokenize", json={"messages": history, "tools": TOOLS}).json()
    text = client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert '"city": "Oslo"' in text and "<tool_response>\nsunny" in text and "get_weather" in text
    assert chat(client, messages=history, tools=TOOLS)["choices"][0]["finish_reason"] == "length"


# ---- reasoning ----------------------------------------------------------------------------------
def test_reasoning_content(client):
    """With the qwen3 reasoning parser a <think> block comes back as reasoning_content and the rest
    as content, the same when streamed; a reply without one has no reasoning_content."""
    body = dict(
        max_tokens=120,
        temperature=0,
        guided_regex="<think>\\nok, 日本[a-z]{2,4}</think>\\n\\nDone 🎉",
    )
    m = chat(client, **body)["choices"][0]["message"]
    assert (
        re.fullmatch("\nok, 日本[a-z]{2,4}", m["reasoning_content"]) and m["content"] == "Done 🎉"
    )
    s = merged(stream(client, **body))
    assert (s["reasoning_content"], s["content"]) == (m["reasoning_content"], m["content"])
    m = chat(client, max_tokens=30, guided_regex="plain [a-z]{3}")["choices"][0]["message"]
    assert "reasoning_content" not in m and m["content"].startswith("plain ")


# ---- LangChain ----------------------------------------------------------------------------------
def test_langchain_chat_openai(server):
    """LangChain's ChatOpenAI streams a reply in more than one non-empty chunk, and with a forced
    tool gets a get_weather call with an allowed city, invoked and streamed."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """Weather of a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="qwen-tiny",
                     max_tokens=8, temperature=0)  # fmt: skip
    chunks = list(llm.stream("Bonjour, ça va ?"))
    assert len(chunks) > 1 and "".join(c.content for c in chunks)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather").bind(max_tokens=40)
    msg = forced.invoke("Weather in Oslo?")
    assert msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"]["city"] in ("Paris", "Oslo")
    streamed = None
    for ch in forced.stream("Weather in Oslo?"):
        streamed = ch if streamed is None else streamed + ch
    assert streamed.tool_calls[0]["name"] == "get_weather"
