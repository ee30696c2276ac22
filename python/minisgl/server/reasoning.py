"""Reasoning parser (`--reasoning-parser qwen3`): an output that starts with `<think>` has its
thinking, up to `</think>`, moved from `content` into `reasoning_content`.

Streaming and whole responses (one final delta) go through the same incremental parser; a
tail that could still grow into a tag waits for the next delta. Without `<think>` at the start
(`enable_thinking: false` closes the block in the prompt) all is content; without `</think>`
(cut by max_tokens) all is reasoning.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def held_tail(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    def __init__(self) -> None:
        self.buf = ""
        self.state = "start"  # start -> think -> content, or start -> content
        self.fresh = False  # just past </think>: drop the newlines Qwen writes after it

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        """(reasoning delta, content delta) safe to emit after `delta`."""
        self.buf += delta
        reasoning = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.state, self.buf = "think", head[len(OPEN) :]
            elif OPEN.startswith(head) and not final:
                return "", ""
            else:
                self.state = "content"
        if self.state == "think":
            end = self.buf.find(CLOSE)
            if end < 0:
                keep = 0 if final else held_tail(self.buf, CLOSE)
                reasoning, self.buf = (
                    self.buf[: len(self.buf) - keep],
                    self.buf[len(self.buf) - keep :],
                )
                return reasoning, ""
            reasoning, self.buf = self.buf[:end], self.buf[end + len(CLOSE) :]
            self.state, self.fresh = "content", True
        content, self.buf = self.buf, ""
        if self.fresh:
            content = content.lstrip("\n")
            self.fresh = not content
        return reasoning, content
