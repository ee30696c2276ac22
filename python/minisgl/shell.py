"""`python -m minisgl --model DIR --shell`: an interactive chat in the terminal.

The shell starts the same worker processes as the HTTP server (launcher.Workers: schedulers,
detokenizer, tokenizer workers) and plays the API server's role itself, over the same ZMQ ipc
sockets and msgpack messages, without HTTP:
  api        PULL, bound here: TextOut / ErrorOut from the detokenizer and tokenizer workers
  launcher   PULL, bound here: Ready from every worker
  tokenizer-0  PUSH: TokenizeReq, and AbortReq (same pipe, so it never overtakes its request)
  detokenizer  PUSH: AbortReq, so the detokenizer frees its state at once

A model with a chat template (or --chat-template) chats: the history is a list of messages
rendered by the template. A base model without one runs in plain-continuation mode: the prompt
is the running transcript (every input and answer so far, concatenated).

Commands: /reset clears the history; /exit, /quit or Ctrl-D leave. Ctrl-C during an answer
aborts that request (the scheduler frees its pages) and returns to the prompt; Ctrl-C at an
empty prompt exits.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from minisgl.args import ServerArgs
from minisgl.messages import AbortReq, ErrorOut, Ready, TextOut, TokenizeReq, decode, encode

logger = logging.getLogger("minisgl.shell")

POLL_MS = 200
STARTUP_TIMEOUT_S = 600.0
HELP = "commands: /reset clears the history, /exit or /quit (or Ctrl-D) leaves"


class WorkerDied(RuntimeError):
    pass


class Client:
    """Synchronous counterpart of server.bridge.Bridge: one request at a time."""

    def __init__(self, args: ServerArgs, workers: Any) -> None:
        import zmq

        self.zmq = zmq
        self.args = args
        self.workers = workers
        d = args.zmq_dir
        self.ctx = zmq.Context()
        self.pull = self._socket(zmq.PULL, f"ipc://{d}/api", bind=True)
        self.ready_pull = self._socket(zmq.PULL, f"ipc://{d}/launcher", bind=True)
        self.tok_push = self._socket(zmq.PUSH, f"ipc://{d}/tokenizer-0")
        self.detok_push = self._socket(zmq.PUSH, f"ipc://{d}/detokenizer")
        self.info: dict[str, Any] = {}
        self.tokenizer_info: dict[str, Any] = {}
        self.next_uid = 1

    def _socket(self, kind: int, addr: str, bind: bool = False) -> Any:
        zmq = self.zmq
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, 0)
        s.bind(addr) if bind else s.connect(addr)
        return s

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def _check_alive(self) -> None:
        reason = self.workers.first_dead()
        if reason is not None:
            raise WorkerDied(reason)

    def wait_ready(self) -> None:
        """Collect Ready from every worker; forward the scheduler's config to the tokenizers."""
        a = self.args
        expected = {f"scheduler{r}" for r in range(a.tp)} | {"detokenizer"}
        expected |= {f"tokenizer-{i}" for i in range(a.num_tokenizer)}
        ready: set[str] = set()
        # every tokenizer worker needs the config, though the shell only uses tokenizer-0
        pushes = [self.tok_push] + [
            self._socket(self.zmq.PUSH, f"ipc://{a.zmq_dir}/tokenizer-{i}")
            for i in range(1, a.num_tokenizer)
        ]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not expected <= ready:
            self._check_alive()
            if time.monotonic() > deadline:
                raise WorkerDied(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
            if not self.ready_pull.poll(POLL_MS):
                continue
            msg = decode(self.ready_pull.recv())
            if not isinstance(msg, Ready):
                continue
            name = "scheduler0" if msg.name == "scheduler" else msg.name
            if name == "scheduler0":
                self.info = dict(msg.info)
                config = encode(Ready("config", self.info))
                for s in pushes:
                    s.send(config)
            elif name.startswith("tokenizer-"):
                self.tokenizer_info = dict(msg.info)
            ready.add(name)

    def submit(self, prompt: str, params: dict[str, Any], chat: bool) -> int:
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        self.tok_push.send(encode(TokenizeReq(uid, prompt, None, params, chat)))
        return uid

    def abort(self, uid: int) -> None:
        self.tok_push.send(encode(AbortReq(uid)))
        self.detok_push.send(encode(AbortReq(uid)))

    def results(self, uid: int):
        """Yield the TextOut / ErrorOut messages of request `uid` until it finishes."""
        while True:
            if not self.pull.poll(POLL_MS):
                self._check_alive()
                continue
            msg = decode(self.pull.recv())
            if not isinstance(msg, TextOut | ErrorOut) or msg.uid != uid:
                continue  # a late message of an aborted request
            yield msg
            if isinstance(msg, ErrorOut) or msg.finished is not None:
                return


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
        if self.session is not None:
            return self.session.prompt(prompt)
        return input(prompt)


class Shell:
    def __init__(self, args: ServerArgs, client: Client, out: Any = sys.stdout) -> None:
        self.args = args
        self.client = client
        self.out = out
        info = client.tokenizer_info
        self.chat = bool(info.get("has_chat_template"))
        self.messages: list[dict[str, str]] = []
        self.transcript = ""

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def reset(self) -> None:
        self.messages = []
        self.transcript = ""

    def build_prompt(self, line: str) -> str:
        if self.chat:
            msgs = self.messages + [{"role": "user", "content": line}]
            return json.dumps({"messages": msgs, "add_generation_prompt": True})
        sep = "" if not self.transcript or self.transcript[-1].isspace() else " "
        return self.transcript + sep + line

    def answer(self, line: str) -> None:
        """Stream one answer; record the turn in the history unless it failed or was aborted."""
        prompt = self.build_prompt(line)
        params = {"temperature": float(self.args.temperature), "max_tokens": self.args.max_tokens}
        c = self.client
        t0 = time.perf_counter()
        uid = c.submit(prompt, params, self.chat)
        parts: list[str] = []
        ntok = 0
        try:
            for msg in c.results(uid):
                if isinstance(msg, ErrorOut):
                    self.write(f"error: {msg.message}\n")
                    if not self.chat or self.messages:
                        self.write("(use /reset to clear the history)\n")
                    return
                ntok += len(msg.token_ids)
                if msg.text:
                    parts.append(msg.text)
                    self.write(msg.text)
        except KeyboardInterrupt:
            c.abort(uid)
            self.write(f"\n[aborted after {ntok} tokens]\n")
            return
        dt = time.perf_counter() - t0
        text = "".join(parts)
        rate = ntok / dt if dt > 0 else 0.0
        self.write(f"\n[{ntok} tokens, {rate:.1f} tok/s]\n")
        if self.chat:
            self.messages += [
                {"role": "user", "content": line},
                {"role": "assistant", "content": text},
            ]
        else:
            self.transcript = prompt + text

    def loop(self, reader: LineReader) -> None:
        while True:
            try:
                line = reader.read(">>> ")
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n")
                return
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                self.reset()
                self.write("(history cleared)\n")
                continue
            if cmd in ("/help", "/?"):
                self.write(HELP + "\n")
                continue
            self.answer(line)


def run_shell(args: ServerArgs) -> int:
    """Start the workers, chat until /exit, Ctrl-D or Ctrl-C at the prompt, stop the workers."""
    from minisgl.server.launcher import Workers
    from minisgl.utils import setup_logging

    if args.log_level == "info":  # the default: keep the workers' logs off the chat
        args = args.replace(log_level="warning")
    setup_logging(args.log_level, "shell")
    workers = Workers(args)
    args = workers.args
    client = None
    status = 0
    try:
        print(f"loading {args.model} ...", flush=True)
        workers.start()
        client = Client(args, workers)
        client.wait_ready()
        shell = Shell(args, client)
        info = client.tokenizer_info
        if not info.get("has_tokenizer", True):
            print("this model has no tokenizer: the shell needs one", file=sys.stderr)
            return 1
        ctx = client.info.get("max_seq_len")
        if shell.chat:
            print(f"chat mode (context {ctx} tokens). {HELP}", flush=True)
        else:
            print(
                "this model has no chat template: plain-continuation mode (each input continues "
                "the transcript so far; pass --chat-template FILE to chat). "
                f"Context {ctx} tokens. {HELP}",
                flush=True,
            )
        shell.loop(LineReader())
    except KeyboardInterrupt:
        print()
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    finally:
        if client is not None:
            client.close()
        workers.stop()
    return status
