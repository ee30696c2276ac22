"""Structured output, tool calls and reasoning in the chat API.

`grammar_for` turns `response_format`, vLLM's `guided_json/regex/choice` and a forcing
`tool_choice` into the engine's grammar spec (engine/grammar.py): a named tool's arguments
object, or for `required` (as vLLM) a JSON array of {"name", "parameters"} calls.

`ChatParser` splits a choice's text into message fields incrementally (a whole response is one
final delta, so streaming agrees with it): reasoning, then tool calls: Hermes / Qwen
`<tool_call>{"name", "arguments"}</tool_call>` blocks for `auto` (anything else, invalid blocks
included, stays content). A streamed call is one OpenAI-shaped delta (index, id, type,
name, arguments); a named call opens with its id and name, then its arguments stream.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .generation import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
THINK, UNTHINK = "<think>", "</think>"


def held_tail(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """`--reasoning-parser qwen3`: an output that starts with `<think>` has its thinking, up to
    `</think>`, in `reasoning_content`. A tail that could still grow into a tag waits for the
    next delta. Without `<think>` at the start (`enable_thinking: false` closes the block in
    the prompt) all is content; without `</think>` (cut by max_tokens) all is reasoning."""

    def __init__(self) -> None:
        self.buf, self.state = "", "start"  # start -> think -> content, or start -> content
        self.fresh = False  # just past </think>: drop the newlines Qwen writes after it

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        """(reasoning delta, content delta) safe to emit after `delta`."""
        self.buf += delta
        reasoning = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK):
                self.state, self.buf = "think", head[len(THINK) :]
            elif THINK.startswith(head) and not final:
                return "", ""
            else:
                self.state = "content"
        if self.state == "think":
            end = self.buf.find(UNTHINK)
            if end < 0:
                keep = 0 if final else held_tail(self.buf, UNTHINK)
                cut = len(self.buf) - keep
                reasoning, self.buf = self.buf[:cut], self.buf[cut:]
                return reasoning, ""
            reasoning, self.buf = self.buf[:end], self.buf[end + len(UNTHINK) :]
            self.state, self.fresh = "content", True
        content, self.buf = self.buf, ""
        if self.fresh:
            content = content.lstrip("\n")
            self.fresh = not content
        return reasoning, content


def _escape(s: str) -> str:  # xgrammar's regex knows no escaped space (re.escape writes one)
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", s)


def grammar_for(req: Any, chat: bool) -> list[str] | None:
    rf, gj, specs = req.response_format, req.guided_json, []
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.json_schema else {"type": "object"}
        specs.append(["json", json.dumps(schema)])
    if gj is not None:
        specs.append(["json", gj if isinstance(gj, str) else json.dumps(gj)])
    if req.guided_regex is not None:
        specs.append(["regex", req.guided_regex])
    if req.guided_choice is not None:
        specs.append(["regex", "|".join(f"({_escape(c)})" for c in req.guided_choice)])
    mode = tool_mode(req) if chat else None
    if isinstance(mode, dict):  # a named tool
        specs.append(["json", json.dumps(mode.get("parameters") or {"type": "object"})])
    elif mode == "required":
        calls = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "parameters"],
                  "properties": {"name": {"enum": [t.function.name]},
                                 "parameters": t.function.parameters or {"type": "object"}}}
                 for t in req.tools]  # fmt: skip
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        specs.append(["json", json.dumps(schema)])
    if len(specs) > 1:
        forcing = "guided_regex, guided_choice and a tool_choice that forces a call"
        raise ApiError(400, f"give at most one of response_format (json), guided_json, {forcing}")
    return specs[0] if specs else None


def tool_mode(req: Any) -> str | dict | None:
    """None (no tools, or "none"), "auto", "required" or the named tool's function dict."""
    if not req.tools or req.tool_choice == "none":
        return None
    tc = req.tool_choice or "auto"
    if isinstance(tc, str):
        return tc
    fn = next(t.function for t in req.tools if t.function.name == tc.function.name)
    return fn.model_dump(exclude_none=True)


def _call(name: str, args: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}  # fmt: skip


def _parse_block(block: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(block)
        args = obj.get("arguments", obj.get("parameters", {}))
    except (ValueError, AttributeError):
        return None
    ok = isinstance(obj.get("name"), str) and isinstance(args, dict)
    return _call(obj["name"], json.dumps(args, ensure_ascii=False)) if ok else None


class ChatParser:
    """One choice's text -> message deltas ({"content", "reasoning_content", "tool_calls"})."""

    def __init__(self, reasoning: bool, mode: str | dict | None, parallel: bool = True) -> None:
        self.reasoning = ReasoningParser() if reasoning else None
        self.mode, self.parallel = mode, parallel
        self.buf, self.inside, self.after, self.space = "", False, False, ""
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reasoning is not None:
            r, text = self.reasoning.feed(text, final)
            if r:
                out["reasoning_content"] = r
        new: list[dict[str, Any]] = []
        if self.mode is None:
            content = text
        elif isinstance(self.mode, dict):  # named: the text is the arguments
            content = ""
            if not self.calls:  # one entry per call and chunk: some clients do not merge in one
                self.calls.append(_call(self.mode["name"], text))
                new.append(self._delta(self.calls[0]))
            elif text:
                self.calls[0]["function"]["arguments"] += text
                new.append({"index": 0, "function": {"arguments": text}})
        elif self.mode == "required":  # a JSON array of calls, complete at the end
            self.buf, content, items = self.buf + text, "", []
            try:
                items = json.loads(self.buf) if final else []
            except ValueError:  # cut by max_tokens: the text as it is
                content = self.buf
            for it in items:
                self.calls.append(_call(it["name"], json.dumps(it["parameters"])))
                new.append(self._delta(self.calls[-1]))
        else:
            content = self._auto(text, final, new)
        if content:
            out["content"] = content
        if new:
            out["tool_calls"] = new
        return out

    def _auto(self, text: str, final: bool, new: list) -> str:
        self.buf += text
        out = ""
        while True:
            tag = CLOSE if self.inside else OPEN
            i = self.buf.find(tag)
            if i < 0:
                break
            head, self.buf = self.buf[:i], self.buf[i + len(tag) :]
            out += self._block(OPEN + head + CLOSE, head, new) if self.inside else self._text(head)
            self.inside = not self.inside
        if self.inside and final:  # cut before </tool_call>: a complete JSON still counts
            out += self._block(OPEN + self.buf, self.buf, new)
        elif not self.inside:
            keep = 0 if final else held_tail(self.buf, OPEN)
            out += self._text(self.buf[: len(self.buf) - keep], final)
            self.buf = self.buf[len(self.buf) - keep :]
        return out

    def _block(self, raw: str, block: str, new: list) -> str:
        call = _parse_block(block)
        if call is None:  # not a call: the block stays content
            return self._text(raw)
        if self.parallel or not self.calls:  # parallel_tool_calls false: the first call only
            self.calls.append(call)
            new.append(self._delta(call))
        self.after, self.space = True, ""
        return ""

    def _text(self, s: str, final: bool = False) -> str:
        """Content; whitespace next to a call is dropped (trailing whitespace waits to see)."""
        if self.after:
            s = s.lstrip()
            if not s:
                return ""
            self.after = False
        s, self.space = self.space + s, ""
        if final:
            return s
        body = s.rstrip()
        self.space = s[len(body) :]
        return body

    def _delta(self, call: dict[str, Any]) -> dict[str, Any]:
        """A streamed tool-call delta (a copy: the named call's arguments grow later)."""
        return {"index": self.calls.index(call), **call, "function": dict(call["function"])}
