"""`minisgl.LLM`: offline batch generation.

With tp=1 it drives a Scheduler in-process (no ZMQ). With tp=N>1 it starts the server's worker
processes (one scheduler per rank, detokenizer, tokenizer workers) and talks to them over ZMQ
like the API server does (server/client.py); call it under `if __name__ == "__main__":` then,
as the workers are spawned.
"""

from __future__ import annotations

import gc
import itertools
import time
import weakref

import torch
from tqdm import tqdm

from .args import ServerArgs
from .core import Batch, Req, SamplingParams
from .engine.engine import Engine
from .engine.grammar import check_grammar
from .messages import ErrorOut, TextOut, TokenOut
from .scheduler.scheduler import Scheduler
from .tokenizer import load_tokenizer

NO_TOKENIZER = "this model directory has no tokenizer: pass token-id lists as prompts"


class LLM:
    def __init__(
        self, model_path: str, device: str = "auto", dtype: str = "auto", **options: object
    ) -> None:
        if device == "auto" and not torch.cuda.is_available():
            print("minisgl: no GPU visible, running on CPU (float32)")
        self.args = ServerArgs(model=model_path, device=device, dtype=dtype, **options)
        self.client = None
        if self.args.nnodes > 1:
            raise ValueError("LLM runs on one node; serve --nnodes N with python -m minisgl")
        if self.args.tp > 1:
            self._init_workers()
            return
        self.engine = Engine(self.args)
        self.tokenizer = load_tokenizer(self.engine.model_path, self.args.chat_template)
        self._outputs: dict[int, list[int]] = {}
        self._logprobs: dict[int, list] = {}
        self._done: set[int] = set()
        self._errors: dict[int, str] = {}
        self.scheduler = Scheduler(self.engine, self.args, self._collect)
        self._uids = itertools.count()
        if self.engine.device == "cuda":
            self.scheduler.warmup()

    def _init_workers(self) -> None:
        from .models.config import resolve_model_path
        from .server.client import WorkerClient

        self.engine = self.scheduler = None  # type: ignore[assignment]
        if self.args.log_level == "info":  # the default: keep the workers' logs quiet
            self.args = self.args.replace(log_level="warning")
        path = resolve_model_path(self.args.model)
        self.tokenizer = load_tokenizer(path, self.args.chat_template)
        self.client = WorkerClient(self.args)
        self._finalizer = weakref.finalize(self, self.client.close)

    def _collect(self, msg: TokenOut | ErrorOut) -> None:
        if isinstance(msg, ErrorOut):
            self._errors[msg.uid] = msg.message
            self._done.add(msg.uid)
            return
        for uid, tok, fin, lp in zip(msg.uids, msg.tokens, msg.finished, msg.logprobs):
            self._outputs[uid].append(tok)
            if lp is not None:
                self._logprobs[uid].append(lp.pairs())
            if fin is not None:
                self._done.add(uid)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(NO_TOKENIZER)
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict[str, object]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if self.client is not None:
            return self._generate_tp(prompts, params, use_tqdm)
        # a collection pauses the host for up to ~10 ms (measured on the H100 machine), long
        # enough to leave the GPU without its next step; reference counting still frees what
        # the batch drops, and cycles are collected after it
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            return self._generate_local(prompts, params, use_tqdm)
        finally:
            if gc_was_on:
                gc.enable()

    def _generate_local(
        self, prompts: list, params: list[SamplingParams], use_tqdm: bool
    ) -> list[dict[str, object]]:
        uids = []
        for prompt, p in zip(prompts, params):
            uid = next(self._uids)
            self._outputs[uid], self._logprobs[uid] = [], []
            bad_grammar = p.grammar is not None and check_grammar(p.grammar)
            err = bad_grammar or self.scheduler.add(uid, self._encode(prompt), p)
            if err is not None:
                for u in uids:
                    self.scheduler.abort(u)
                raise ValueError(err)
            uids.append(uid)
        bar = tqdm(total=len(uids), desc="Generating", disable=not use_tqdm, unit="req")
        start = time.perf_counter()
        pending = set(uids)
        while pending:
            self.scheduler.step()
            left = len(pending)
            pending -= self._done
            if len(pending) < left:
                rate = sum(len(self._outputs[u]) for u in uids) / (time.perf_counter() - start)
                bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
                bar.update(left - len(pending))
        while self.scheduler.busy and not self.scheduler.waiting and not self.scheduler.running:
            self.scheduler.step()  # drain the step still in flight under overlap
        bar.close()
        self._done.difference_update(uids)
        got = [(self._outputs.pop(u), self._logprobs.pop(u)) for u in uids]
        errors = [self._errors.pop(u) for u in uids if u in self._errors]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        return [self._result(p, ids, lps) for p, (ids, lps) in zip(params, got)]

    def _generate_tp(
        self, prompts: list, params: list[SamplingParams], use_tqdm: bool
    ) -> list[dict[str, object]]:
        """Submit every request to the workers at once; gather the TextOut deltas per uid."""
        c = self.client
        if c.closed:
            raise RuntimeError("this LLM has been shut down")
        if self.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise ValueError(NO_TOKENIZER)
        uids = [c.submit(p, sp) for p, sp in zip(prompts, params)]
        outputs: dict[int, list[int]] = {u: [] for u in uids}
        lps: dict[int, list] = {u: [] for u in uids}
        pending = set(uids)
        bar = tqdm(total=len(uids), desc="Generating", disable=not use_tqdm, unit="req")
        start, toks = time.perf_counter(), 0
        try:
            while pending:
                msg = c.recv()
                if not isinstance(msg, TextOut | ErrorOut) or msg.uid not in pending:
                    continue  # Stats, or a late message of a request aborted earlier
                if isinstance(msg, ErrorOut):
                    pending.discard(msg.uid)
                    c.done(msg.uid)
                    raise ValueError(msg.message)
                outputs[msg.uid] += msg.token_ids
                lps[msg.uid] += [e.pairs() for e in msg.logprobs if e]
                toks += len(msg.token_ids)
                if msg.finished is not None:
                    pending.discard(msg.uid)
                    c.done(msg.uid)
                    rate = toks / (time.perf_counter() - start)
                    bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
                    bar.update(1)
        finally:
            bar.close()
            for u in pending:  # an error or an interrupt: drop the rest of the batch
                c.abort(u)
        return [self._result(p, outputs[u], lps[u]) for u, p in zip(uids, params)]

    def _result(self, p: SamplingParams, ids: list[int], lps: list) -> dict[str, object]:
        """With `logprobs=k`: per output token [logprob, [[id, logprob] x k]] (raw model logits)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
        return {"text": text, "token_ids": ids, **({"logprobs": lps} if p.logprobs >= 0 else {})}

    @torch.inference_mode()
    def prefill_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits at every position of one prompt, through the engine's own prefill
        (no prefix cache), for correctness tests."""
        if self.client is not None:
            raise ValueError("prefill_logits needs tp=1")
        mem, n = self.scheduler.mem, len(token_ids)
        req = Req(-1, list(token_ids), SamplingParams(max_tokens=1))
        if not mem.free_rows or not mem.ensure_free(mem.pages_to_extend(req, n)):
            raise RuntimeError("engine is busy")
        req.table_idx = mem.free_rows.pop()
        try:
            batch = Batch([req], True, [n], [0], [False], mem.extend(req, n), list(token_ids))
            req.cached_len = n
            return self.engine.prefill_logits(batch).float().cpu()
        finally:
            req.cache_hit, req.token_ids = 0, []
            mem.release(req)

    def shutdown(self) -> None:
        """Drop the engine and give its device memory back (tp>1: stop every worker process)."""
        if self.client is not None:
            self._finalizer()  # WorkerClient.close, once; also run at GC and at exit
            return
        self.scheduler = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]
        gc.unfreeze()  # the engine froze what existed at its start, itself included
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
