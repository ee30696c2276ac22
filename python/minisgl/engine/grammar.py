"""Structured output: grammars compiled with xgrammar (imported lazily: only requests with a
grammar need it) on a background thread, off the scheduler loop, and cached by their spec.

A request carries `params.grammar = [kind, spec]`: kind "json" with a JSON schema (any JSON
object is '{"type": "object"}') or "regex". The tokenizer worker checks the spec first
(`check_grammar`, no vocabulary needed) so a bad schema is a 400 before the scheduler sees it.
The scheduler submits the compile when the request arrives and admits the request once it is
compiled (xgrammar releases the GIL while compiling: measured, the loop keeps running); with
TP > 1 every rank waits for its compile on arrival instead, so that all ranks admit the request
in the same step. logits.py turns the compiled grammar into a per-step bitmask.

JSON is generated without free whitespace (`any_whitespace=False`): a model cannot stall in
an endless run of spaces and newlines, and the output is compact JSON.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

CACHE_SIZE = 256  # compiled grammars kept (by spec)


def check_grammar(grammar: list[str]) -> str | None:
    """Why `grammar` cannot be compiled (a user-facing message), or None."""
    try:
        import xgrammar as xgr
    except ImportError:
        return "structured output needs the xgrammar package: pip install 'minisgl[grammar]'"

    kind, spec = grammar
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        else:
            xgr.Grammar.from_regex(spec)
    except Exception as e:  # xgrammar raises RuntimeError with its C++ location in front
        msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[0])
        return f"invalid {'JSON schema' if kind == 'json' else 'regex'}: {msg}"
    return None


class GrammarCompiler:
    def __init__(self, model_path: str, vocab_size: int, stop_ids: list[int]) -> None:
        self.model_path, self.vocab_size, self.stop_ids = model_path, vocab_size, stop_ids
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._compiler: Any = None

    def submit(self, grammar: list[str]) -> Future:
        key = (grammar[0], grammar[1])
        fut = self.cache.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self.cache[key] = self.pool.submit(self._compile, *key)
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return fut

    def _compile(self, kind: str, spec: str) -> Any:
        import xgrammar as xgr

        if self._compiler is None:  # the vocabulary, once (~0.6 s for 152K tokens), here too
            from ..tokenizer import load_tokenizer

            tok = load_tokenizer(self.model_path)
            if tok is None:
                raise ValueError("structured output needs the model's tokenizer")
            info = xgr.TokenizerInfo.from_huggingface(
                tok, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        if kind == "json":
            return self._compiler.compile_json_schema(spec, any_whitespace=False)
        return self._compiler.compile_regex(spec)
