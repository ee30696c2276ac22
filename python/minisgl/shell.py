"""`python -m minisgl --model DIR --shell`: an interactive chat in the terminal.

The shell starts the same worker processes as the HTTP server and plays the API server's role
itself through server.client.WorkerClient (the same ZMQ ipc sockets and msgpack messages,
without HTTP).

A model with a chat template (or --chat-template) chats: the history is a list of messages
rendered by the template. A base model without one runs in plain-continuation mode: the prompt
is the running transcript (every input and answer so far, concatenated).

Answers get --max-tokens new tokens, by default a quarter of the context (at most 512), so the
history keeps three quarters. When the history no longer fits beside a new input, the oldest
turns are dropped (and the shell says so) until it does.

Commands: /reset clears the history; /exit, /quit or Ctrl-D leave; any other /word gets the
help (a line starting with a space is sent as it is). Ctrl-C during an answer aborts that
request (the scheduler frees its pages) and returns to the prompt; Ctrl-C at an empty prompt
exits.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Any

from minisgl.args import ServerArgs
from minisgl.core import SamplingParams
from minisgl.messages import ErrorOut
from minisgl.server.client import WorkerClient, WorkerDied

HELP = "commands: /reset clears the history, /exit or /quit (or Ctrl-D) leaves"
DEFAULT_MAX_TOKENS = 512


class LineReader:
    """prompt_toolkit on a terminal (line editing, history of inputs), input() otherwise."""

    def __init__(self) -> None:
        self.session = None
        if sys.stdin.isatty() and sys.stdout.isatty():
            try:
                from prompt_toolkit import PromptSession
                from prompt_toolkit.history import InMemoryHistory
                from prompt_toolkit.key_binding import KeyBindings
            except ImportError:
                return
            kb = KeyBindings()

            @kb.add("c-c")
            def _(event: Any) -> None:
                buf = event.app.current_buffer
                if buf.text:  # Ctrl-C on a typed line clears it; on an empty one, exit
                    buf.reset()
                else:
                    event.app.exit(exception=KeyboardInterrupt())

            self.session = PromptSession(history=InMemoryHistory(), key_bindings=kb)

    def read(self, prompt: str) -> str:
        """A line; EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C."""
        return input(prompt) if self.session is None else self.session.prompt(prompt)


class Shell:
    def __init__(self, args: ServerArgs, client: WorkerClient, out: Any = sys.stdout) -> None:
        self.args, self.client, self.out = args, client, out
        self.chat = bool(client.tokenizer_info.get("has_chat_template"))
        self.turns: list[tuple[str, str]] = []  # (input, answer), oldest first

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def build_prompt(self, line: str) -> str:
        if self.chat:  # every input and answer so far, then this input
            msgs = [{"role": role, "content": text} for turn in [*self.turns, (line,)]
                    for role, text in zip(("user", "assistant"), turn)]  # fmt: skip
            return json.dumps({"messages": msgs, "add_generation_prompt": True})
        text = ""  # plain continuation: every input and answer so far, then this input
        for said, answer in [*self.turns, (line, "")]:
            text += ("" if not text or text[-1].isspace() else " ") + said + answer
        return text

    def answer(self, line: str) -> None:
        """Stream one answer; record the turn in the history unless it failed or was aborted."""
        params = SamplingParams(float(self.args.temperature), max_tokens=self.args.max_tokens)
        c = self.client
        t0 = time.perf_counter()
        parts: list[str] = []
        ntok = uid = 0
        try:
            while True:
                uid = c.submit(self.build_prompt(line), params, self.chat)
                results = c.results(uid)
                first = next(results)
                # the tokenizer's length errors all say "context": with a history to spare,
                # drop its oldest turn and ask again
                if not (isinstance(first, ErrorOut) and "context" in first.message and self.turns):
                    break
                self.turns.pop(0)
                self.write(f"(context full: dropped the oldest turn, {len(self.turns)} kept)\n")
            for msg in itertools.chain([first], results):
                if isinstance(msg, ErrorOut):
                    self.write(f"error: {msg.message}\n")
                    return
                ntok += len(msg.token_ids)
                parts.append(msg.text)
                self.write(msg.text)
        except KeyboardInterrupt:
            c.abort(uid)
            self.write(f"\n[aborted after {ntok} tokens]\n")
            return
        dt = time.perf_counter() - t0
        rate = ntok / dt if dt > 0 else 0.0
        self.write(f"\n[{ntok} tokens, {rate:.1f} tok/s]\n")
        self.turns.append((line, "".join(parts)))

    def loop(self, reader: LineReader) -> None:
        while True:
            try:
                line = reader.read(">>> ")
            except (EOFError, KeyboardInterrupt):
                self.write("\n")
                return
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                self.turns.clear()
                self.write("(history cleared)\n")
                continue
            if line.startswith("/"):  # /help, /? and any unknown command
                known = cmd in ("/help", "/?")
                self.write(("" if known else f"unknown command {cmd.split()[0]}; ") + HELP + "\n")
                continue
            self.answer(line)


def run_shell(args: ServerArgs) -> int:
    """Start the workers, chat until /exit, Ctrl-D or Ctrl-C at the prompt, stop the workers."""
    from minisgl.utils import setup_logging

    if args.log_level == "info":  # the default: keep the workers' logs off the chat
        args = args.replace(log_level="warning")
        # and the libraries' warnings too (the workers inherit the environment)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    setup_logging(args.log_level, "shell")
    client, status = None, 0
    try:
        print(f"loading {args.model_name} ...", flush=True)
        client = WorkerClient(args)  # starts the workers and waits until all are ready
        if not client.tokenizer_info.get("has_tokenizer", True):
            print("this model has no tokenizer: the shell needs one", file=sys.stderr)
            return 1
        ctx = client.limits.max_seq_len
        if args.max_tokens is not None and args.max_tokens >= ctx:
            print(f"error: --max-tokens {args.max_tokens} leaves no room for an input in the "
                  f"context of {ctx} tokens", file=sys.stderr)  # fmt: skip
            return 2
        fitted = args.max_tokens or min(DEFAULT_MAX_TOKENS, max(1, ctx // 4))
        shell = Shell(client.args.replace(max_tokens=fitted), client)
        lead = "chat mode (" if shell.chat else (
            "this model has no chat template: plain-continuation mode (each input continues "
            "the transcript so far; pass --chat-template FILE to chat; ")  # fmt: skip
        print(f"{lead}context {ctx} tokens, answers up to {fitted}). {HELP}", flush=True)
        shell.loop(LineReader())
    except KeyboardInterrupt:
        print()
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    finally:
        if client is not None:
            client.close()
    return status
