"""Tokenizer worker: TokenizeReq (text, token ids or chat messages) -> UserReq for the scheduler.

It renders chat templates, tokenizes, and rejects what the scheduler must never see: token ids
outside the vocabulary and prompt + max_tokens beyond the context (ErrorOut 400 to the API).
The context length and vocabulary size (`Limits`) are read from the model's config.json by the
launcher and handed to every worker at spawn.

A chat template is a program (the operator's `--chat-template` may loop forever): rendering runs
under a SIGALRM timer, so after RENDER_TIMEOUT_S the request fails and the worker lives on.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

from minisgl.messages import AbortReq, ErrorOut, Limits, TokenizeReq, UserReq, check_prompt

logger = logging.getLogger("minisgl.tokenizer")
RENDER_TIMEOUT_S = 2.0

NO_TEMPLATE = (
    "this model has no chat template: start the server with --chat-template FILE "
    "or use /v1/completions"
)


class TokenizerWorker:
    def __init__(self, tokenizer: Any | None, limits: Limits) -> None:
        self.tok, self.limits = tokenizer, limits
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # a prompt longer than this many characters cannot fit: skip tokenizing huge texts
        try:
            longest = max(len(p) for p in tokenizer.get_vocab()) + 1
        except Exception:  # an exotic tokenizer, or none (which tokenizes no text at all)
            longest = 256
        self.max_chars = limits.max_seq_len * max(longest, 16)

    def handle(self, req: TokenizeReq) -> UserReq | ErrorOut:
        try:
            return self._handle(req)
        except _Reject as e:
            return ErrorOut(req.uid, str(e), e.status)
        except Exception as e:  # a template or tokenizer error is the request's fault
            logger.warning("request %d rejected: %r", req.uid, e)
            return ErrorOut(req.uid, f"could not tokenize the prompt: {e}", 400)

    def _handle(self, req: TokenizeReq) -> UserReq:
        if req.input_ids is not None:
            ids = [int(i) for i in req.input_ids]
        else:
            ids = self.tokenize(req.text or "", req.chat)
        try:
            params = check_prompt(ids, req.params, self.limits, req.fill)
        except ValueError as e:  # PromptError, or min_tokens beyond a filled max_tokens
            raise _Reject(str(e)) from None
        if params.grammar:  # a bad schema is a 400 here, off the scheduler's path
            if not self.tok:
                raise _Reject("structured output needs a tokenizer")
            from minisgl.engine.grammar import check_grammar

            if err := check_grammar(params.grammar):
                raise _Reject(err)
        return UserReq(req.uid, ids, params)

    def tokenize(self, text: str, chat: bool, add_special: bool = True) -> list[int]:
        """Token ids of a text prompt, or of chat messages (a JSON payload: messages, tools,
        add_generation_prompt, kwargs for the template) rendered by the chat template."""
        if self.tok is None:
            raise _Reject("this model has no tokenizer: send token ids instead of text")
        if chat:
            if not self.has_chat_template:
                raise _Reject(NO_TEMPLATE)
            payload = json.loads(text)
            # the timer needs the main thread (the tokenizer worker); the API process's
            # /tokenize renders on a thread, where a template loop only costs that thread
            timed = threading.current_thread() is threading.main_thread()
            if timed:
                signal.signal(signal.SIGALRM, _render_timeout)
                # again every 0.5 s, in case the template swallows the first one
                signal.setitimer(signal.ITIMER_REAL, RENDER_TIMEOUT_S, 0.5)
            try:
                text = self.tok.apply_chat_template(
                    payload["messages"], tools=payload.get("tools"), tokenize=False,
                    add_generation_prompt=payload.get("add_generation_prompt", True),
                    **payload.get("kwargs", {}),
                )  # fmt: skip
            finally:
                if timed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            add_special = False  # the template writes BOS itself when the model wants one
        if len(text) > self.max_chars:
            raise _Reject(
                f"the prompt ({len(text)} characters) is longer than the model's context of "
                f"{self.limits.max_seq_len} tokens"
            )
        return list(self.tok.encode(text, add_special_tokens=add_special))


class _Reject(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _render_timeout(*_: Any) -> None:
    raise _Reject(f"the chat template did not finish rendering in {RENDER_TIMEOUT_S:g} s", 500)


def run_tokenizer(args: Any, index: int, limits: Limits) -> None:
    """Process entry: PULL at tokenizer-{index}; PUSH to the scheduler and the API (ipc.py)."""
    import zmq

    from minisgl import ipc

    from .detokenizer import load_tokenizer

    tokenizer = load_tokenizer(args)  # --chat-template is applied to tokenizer.chat_template
    worker = TokenizerWorker(tokenizer, limits)
    d, ctx, name = args.zmq_dir, zmq.Context(), ipc.tokenizer(index)
    pull = ipc.pull(ctx, d, name)
    sched, api = ipc.push(ctx, d, ipc.SCHEDULER), ipc.push(ctx, d, ipc.API)
    info = {"has_tokenizer": tokenizer is not None, "has_chat_template": worker.has_chat_template}
    _ready = ipc.announce(ctx, d, name, info)

    def handle(msg: Any) -> None:
        if isinstance(msg, TokenizeReq):
            out = worker.handle(msg)
            ipc.send(sched if isinstance(out, UserReq) else api, out)
        elif isinstance(msg, AbortReq):
            ipc.send(sched, msg)  # same pipe as the request: never overtakes it

    ipc.Inbox(name, TokenizeReq, AbortReq).serve(pull, handle, api)
