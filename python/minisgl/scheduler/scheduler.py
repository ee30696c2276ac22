"""Continuous batching over one engine: admission with chunked prefill, decode batches,
retraction under KV pressure, stop conditions, aborts and overlap scheduling.

Overlap: `step()` schedules and launches batch N+1 before it reads batch N's tokens, so the CPU
work of scheduling hides behind the device. Decode inputs are read on the device from the
engine's `next_tokens`, so launching N+1 never waits for N.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from .. import env
from ..args import ServerArgs
from ..core import Batch, Req, SamplingParams, stop_reason
from ..engine.engine import Engine, StepOutput
from ..messages import ErrorOut, Limits, Logprob, TokenOut, check_prompt
from .memory import ReqMemory

log = logging.getLogger("minisgl.scheduler")


class Scheduler:
    def __init__(
        self, engine: Engine, args: ServerArgs, on_output: Callable[[TokenOut | ErrorOut], None]
    ) -> None:
        self.engine, self.on_output = engine, on_output
        self.mem = ReqMemory(engine, args.cache)
        self.max_running = engine.max_reqs
        self.prefill_budget = args.max_prefill_length
        self.overlap = env.overlap_scheduling()
        self.sort_decode = env.decode_sort()
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted; the first may still be mid-prefill (chunked)
        self.chunked: Req | None = None
        self.reqs: dict[int, Req] = {}
        self.waiting_tokens = 0  # sum of len(token_ids) over `waiting` (admission control)
        self.last: StepOutput | None = None
        self.last_was_prefill = False
        self.eos = set(engine.cfg.eos_token_ids)
        self.vocab = engine.cfg.vocab_size
        self.debug_checks = False  # tests turn on the invariant check after every step
        self.grammars = None  # GrammarCompiler, made for the first request with a grammar
        self.counters = dict(prefix_hit_tokens=0, prefill_tokens=0, decode_tokens=0, retracted=0)

    # -- requests in ----------------------------------------------------------------------
    def add(self, uid: int, input_ids: list[int], params: SamplingParams) -> str | None:
        """Queue a request; or, queueing nothing, a user-facing reason why it can never run."""
        try:
            check_prompt(input_ids, params, Limits(self.engine.max_seq_len, self.vocab))
        except ValueError as e:
            return str(e)
        total = len(input_ids) + params.max_tokens
        if total > self.engine.max_tokens_in_pool:
            return f"prompt + max_tokens = {total} tokens exceeds the KV cache ({self.engine.max_tokens_in_pool})"
        if uid in self.reqs:
            return f"duplicate request id {uid}"
        req = Req(uid, list(input_ids), params)
        if params.grammar is not None:
            from ..engine.grammar import GrammarCompiler

            self.grammars = self.grammars or GrammarCompiler(self.engine)
            req.grammar = self.grammars.submit(params.grammar)
            if self.engine.tp.size > 1:  # every rank admits it in the same step
                req.grammar.exception()
        self.reqs[uid] = req
        self.waiting.append(req)
        self.waiting_tokens += len(req.token_ids)
        return None

    def abort(self, uid: int) -> bool:
        req = self.reqs.get(uid)
        if req is None or req.finished:
            return False
        self._finish(req)  # whoever aborts already knows: no output
        return True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.last)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> None:
        batch = self._schedule()
        out = self.engine.forward(batch) if batch else None
        if self.overlap:
            last, self.last = self.last, out
            if last is not None:
                self._process(last)
        elif out is not None:
            self._process(out)
        if self.debug_checks:
            self.mem.check(list(self.reqs.values()))

    def _schedule(self) -> Batch | None:
        decodable = [r for r in self.running if r is not self.chunked and r.can_decode]
        if (self.chunked or self.waiting) and not (self.last_was_prefill and decodable):
            batch = self._schedule_prefill()
            if batch is not None:
                self.last_was_prefill = True
                return batch
        self.last_was_prefill = False
        return self._schedule_decode(decodable) if decodable else None

    def _schedule_prefill(self) -> Batch | None:
        budget = self.prefill_budget
        reqs: list[Req] = []
        extends: list[int] = []
        prefix: list[int] = []
        out_loc: list[int] = []

        def take(req: Req) -> None:
            nonlocal budget
            n = min(req.extend_len, budget)
            # pages are allocated at once so the next admission sees what is really free
            reqs.append(req), extends.append(n), prefix.append(req.cached_len)
            out_loc.extend(self.mem.extend(req, n))
            req.cached_len += n
            budget -= n

        chunked, self.chunked = self.chunked, None
        if chunked is not None:
            n = min(chunked.extend_len, budget)
            if not self.mem.ensure_free(self.mem.pages_to_extend(chunked, n)):
                self.chunked = chunked  # retry once decoding requests have freed pages
                return None  # and admit nobody before it
            take(chunked)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            if req.token_in_flight:
                break  # a retracted request: readmitted once its last token has arrived
            if req.grammar is not None and not req.grammar.done():
                break  # its grammar is still compiling (engine/grammar.py)
            if req.grammar is not None and req.grammar.exception() is not None:
                self._finish(req)
                self.on_output(ErrorOut(req.uid, f"grammar: {req.grammar.exception()}", 400))
                continue
            if not self.mem.admit(req, budget, reserve=len(self.running)):
                break
            self.waiting.popleft()
            self.waiting_tokens -= len(req.token_ids)
            self.running.append(req)
            if req.prompt_cached < 0:
                req.prompt_cached = min(req.cached_len, req.prompt_len)
                self.counters["prefix_hit_tokens"] += req.prompt_cached
            take(req)
        if not reqs:
            return None
        input_ids = [t for r, p, n in zip(reqs, prefix, extends) for t in r.token_ids[p : p + n]]
        sample = [r.cached_len == r.device_len for r in reqs]  # False: the budget ran out
        self.chunked = next((r for r, done in zip(reqs, sample) if not done), None)
        batch = Batch(reqs, True, extends, prefix, sample, out_loc, input_ids)
        batch.kv_copy = self.mem.take_copies()
        self._advance(batch)
        self.counters["prefill_tokens"] += sum(extends)
        return batch

    def _schedule_decode(self, reqs: list[Req]) -> Batch | None:
        ps = self.mem.ps
        need = sum(r.cached_len % ps == 0 for r in reqs)
        while not self.mem.ensure_free(need):
            victim = reqs.pop()  # the newest request gives its pages back and is recomputed later
            need -= victim.cached_len % ps == 0
            self._retract(victim)
            if not reqs:
                return None
        if self.sort_decode:
            # longest context first: the decode kernel's thread blocks go out in batch order,
            # so each SM gets a mix of long and short requests (measured: benchmark/attn_split)
            reqs.sort(key=lambda r: -r.cached_len)
        prefix = [r.cached_len for r in reqs]
        out_loc = self.mem.extend_decode(reqs)
        for r in reqs:
            r.cached_len += 1
        batch = Batch(reqs, False, [1] * len(reqs), prefix, [True] * len(reqs), out_loc)
        self._advance(batch)
        self.counters["decode_tokens"] += len(reqs)
        return batch

    def _advance(self, batch: Batch) -> None:
        sampled = batch.sampled_reqs  # a property that builds its list: once per step
        batch.sample_positions = [r.device_len for r in sampled]
        for r in sampled:
            r.device_len += 1

    def _retract(self, req: Req) -> None:
        log.info("KV cache full: retracting request %d (will be recomputed)", req.uid)
        self.counters["retracted"] += 1
        self.running.remove(req)
        self.mem.release(req)
        self.waiting.appendleft(req)
        self.waiting_tokens += len(req.token_ids)

    def warmup(self) -> float:
        """Run every path a request can take once before serving (prefill with and without a
        cached prefix, chunked prefill, graph decode, greedy, temperature, top-k/top-p, seeds,
        logprobs), so that FlashInfer's JIT modules and Triton's kernels are compiled now: on a
        fresh H200 the first requests otherwise waited 79 s for their first token. Leaves no
        trace: outputs dropped, cache flushed, counters reset. Returns the seconds it took."""
        log.info("warm-up: compiling the prefill, decode and sampling kernels")
        start, emit, budget = time.perf_counter(), self.on_output, self.prefill_budget
        self.on_output = lambda _msg: None
        n = max(1, min(2 * self.mem.ps + 3, (self.engine.max_seq_len - 8) // 2))
        base = [(7 * i + 3) % self.vocab for i in range(n)]
        kinds = [
            dict(temperature=0.0), dict(temperature=0.7), dict(temperature=0.7, seed=1),
            dict(temperature=0.7, top_k=4, top_p=0.9, logprobs=2),
        ]  # fmt: skip
        try:
            for rnd in range(2):  # the second round hits the prefix cache and chunks
                self.prefill_budget = budget if rnd == 0 else max(1, n // 2)
                for i, kw in enumerate(kinds):
                    prompt = base[: n - i] if rnd == 0 else base + [i + 1] * (i + 1)
                    params = SamplingParams(max_tokens=4, ignore_eos=True, **kw)
                    uid = -1 - i - len(kinds) * rnd
                    self.add(uid, prompt[: self.engine.max_seq_len - 4], params)
                while self.busy:
                    self.step()
        finally:
            self.on_output, self.prefill_budget = emit, budget
        self.mem.ensure_free(self.mem.pages.num_pages)  # evicts the warm-up's cached prefixes
        self.counters = dict.fromkeys(self.counters, 0)
        seconds = time.perf_counter() - start
        log.info("warm-up done in %.1f s", seconds)
        return seconds

    # -- results ----------------------------------------------------------------------------
    def _process(self, out: StepOutput) -> None:
        """A launched step's results: append its tokens, stop requests, send one `TokenOut`."""
        self._share_chunks(out.batch)
        if out.tokens is None:
            return
        out.wait()
        sampled, rows = out.batch.sampled_reqs, []
        for req, tok, logprob in zip(sampled, out.tokens.tolist(), _logprobs(out, sampled)):
            if req.finished:
                continue  # stopped (EOS, abort) while this step was already in flight
            if not 0 <= tok < self.vocab:
                self._fail_corrupted(req, tok)
                continue
            req.token_ids.append(tok)
            reason = stop_reason(req, self.eos, self.engine.max_seq_len)
            fin = reason.value if reason else None
            rows.append((req.uid, tok, fin, logprob, req.prompt_cached, req.prompt_len))
            if reason is not None:
                self._finish(req)
        if rows:
            self.on_output(TokenOut(*map(list, zip(*rows))))  # a row per token, in field order

    def _share_chunks(self, b: Batch) -> None:
        for req, p, e, s in zip(b.reqs, b.prefix_lens, b.extend_lens, b.sample_mask):
            if not s and not req.finished:  # a chunk done: later requests can share it
                self.mem.cache_prefix(req, p + e)

    def _fail_corrupted(self, req: Req, tok: int) -> None:
        # issue 15: a step's host copy was overwritten. Fail this request alone; checked on
        # the host copy, where that corruption happened, after the step's event (no sync)
        log.error("request %d: sampled id %d outside [0, %d)", req.uid, tok, self.vocab)
        self._finish(req)
        self.on_output(ErrorOut(req.uid, "internal error: invalid token sampled", 500))

    def _finish(self, req: Req) -> None:
        req.finished = True
        if req in self.running:
            self.running.remove(req)
            self.mem.release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            self.waiting_tokens -= len(req.token_ids)
        if self.chunked is req:
            self.chunked = None
        del self.reqs[req.uid]

    def stats(self) -> dict[str, float]:
        pages, cache = self.mem.pages, self.mem.cache
        cached = (cache.evictable_tokens + cache.protected_tokens) // self.mem.ps
        return dict(running_reqs=len(self.running), waiting_reqs=len(self.waiting),
                    pages_total=pages.num_pages, pages_free=pages.num_free, pages_cached=cached,
                    pages_used=pages.num_pages - pages.num_free, **self.counters)  # fmt: skip


def _logprobs(out: StepOutput, sampled: list[Req]) -> list[Logprob | None]:
    """Per sampled request: its Logprob record with `logprobs=k` (k top entries), else None.
    The step gathered one row per request that asked for them, in batch order."""
    if out.logprobs is None:
        return [None] * len(sampled)
    found = zip(*(x.tolist() for x in out.logprobs))  # (chosen, top values, top ids) per row
    rows: list[Logprob | None] = []
    for req in sampled:
        if (n := req.params.logprobs) >= 0:
            chosen, values, ids = next(found)
            rows.append(Logprob(chosen, ids[:n], values[:n]))
        else:
            rows.append(None)
    return rows
