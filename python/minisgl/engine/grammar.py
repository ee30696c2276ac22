"""Structured output: grammars compiled with xgrammar (imported lazily: only requests with a
grammar need it) on a background thread, off the scheduler loop, and cached by their spec.

`params.grammar = [kind, spec]`: "json" with a JSON schema, or "regex". The tokenizer worker
checks the spec (`check_grammar`, no vocabulary needed): a bad one is a 400 before the
scheduler sees it. The scheduler submits the compile on arrival and admits the request once
compiled (xgrammar releases the GIL meanwhile); with TP > 1 each rank waits for it on arrival,
so all ranks admit it in the same step. logits.py applies the per-step bitmask. JSON has no
free whitespace (`any_whitespace=False`): no model can stall in endless blank lines.
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
        xgr.Grammar.from_json_schema(spec) if kind == "json" else xgr.Grammar.from_regex(spec)
    except Exception as e:  # xgrammar raises RuntimeError with its C++ location in front
        msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[0])
        return f"invalid {'JSON schema' if kind == 'json' else 'regex'}: {msg}"
    return None


class GrammarCompiler:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._compiler: Any = None

    def submit(self, grammar: list[str]) -> Future:
        key = (grammar[0], grammar[1])
        fut = self.cache.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):  # a failure is retried
            fut = self.cache[key] = self.pool.submit(self._compile, *key)
        self.cache.move_to_end(key)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return fut

    def _compile(self, kind: str, spec: str) -> Any:
        import xgrammar as xgr

        if self._compiler is None:  # the vocabulary, once (~0.6 s for 152K tokens), here too
            from ..tokenizer import load_tokenizer

            cfg, tok = self.engine.cfg, load_tokenizer(self.engine.model_path)
            if tok is None:
                raise ValueError("structured output needs the model's tokenizer")
            info = xgr.TokenizerInfo.from_huggingface(
                tok, vocab_size=cfg.vocab_size, stop_token_ids=cfg.eos_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        if kind == "json":
            return self._compiler.compile_json_schema(spec, any_whitespace=False)
        return self._compiler.compile_regex(spec)
