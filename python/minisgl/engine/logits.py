"""Logits processing before sampling: grammar masks, logit_bias, min_tokens, repetition /
frequency / presence penalties and min_p, as batched torch ops over the rows that use them.

Batches without such a row keep the sampler's fast path (on the GPU the Gumbel kernel inside
the decode graph). A request's state lives as long as its `Req` (weak dictionary): a slot in
device pools of output-token counts and prompt-token flags ([slots, vocab]), updated by one
scatter per sampling, so nothing waits for the host, whose tokens lag a step under overlap
scheduling. Grammar matchers (xgrammar) advance on the host: a step copies its grammar rows'
tokens out without blocking; the next grammar step waits for them (for the previous step's
sampling only: its own forward is already queued) and fills its bitmask while the device runs.

vLLM's order: grammar mask, logit_bias, min_tokens, repetition, frequency and presence
penalties, min_p (at the row's temperature); the sampler then does temperature/top-k/top-p.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..core import Req
from ..utils import h2d


@dataclass(eq=False)
class _State:
    slot: int
    matcher: Any = None  # xgrammar.GrammarMatcher
    sampled: int = 0  # tokens sampled so far (counted here: the host's token_ids lag a step)


class LogitsProcessor:
    def __init__(self, device: str, stop_ids: list[int]) -> None:
        self.device, self.stop_ids = device, list(stop_ids)
        self.states: weakref.WeakKeyDictionary[Req, _State] = weakref.WeakKeyDictionary()
        self.counts = torch.zeros(0, 0, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.free: list[int] = []
        self.pending: tuple | None = None  # (host tokens, event, states) of the last grammar step
        self._rows: tuple = ()

    def _state(self, req: Req, vocab: int) -> _State:
        st = self.states.get(req)
        if st is not None:
            return st
        if not self.free:  # double the pools; slots come back when their Req is collected
            n, grow = self.counts.shape[0], max(self.counts.shape[0], 8)
            self.counts, self.in_prompt = (torch.cat([t.view(n, vocab), t.new_zeros(grow, vocab)])
                                           for t in (self.counts, self.in_prompt))  # fmt: skip
            self.free.extend(range(n + grow - 1, n - 1, -1))  # the list finalizers append to
        st = _State(self.free.pop())
        self.counts[st.slot].zero_()
        self.in_prompt[st.slot].zero_()
        p = req.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(req.token_ids[: req.prompt_len], dtype=torch.int64)
            self.in_prompt[st.slot, h2d(ids, self.device)] = True
        if p.grammar is not None:
            import xgrammar as xgr

            st.matcher = xgr.GrammarMatcher(req.grammar.result())
        self.states[req] = st
        weakref.finalize(req, self.free.append, st.slot)
        return st

    def apply(self, logits: torch.Tensor, reqs: list[Req], temps: list[float]) -> torch.Tensor:
        """New processed logits (float32); the input stays intact for the logprobs."""
        vocab = logits.shape[-1]
        logits = logits.to(torch.float32, copy=True)
        rows = [i for i, r in enumerate(reqs) if r.params.needs_processing]
        states = [self._state(reqs[i], vocab) for i in rows]
        ps = [reqs[i].params for i in rows]
        self._grammar_mask(logits, rows, states)
        bias, ban = [], []  # (row, token, value) triples and (row, token) pairs
        for i, st, p in zip(rows, states, ps):
            bias += [(i, t, v) for t, v in (p.logit_bias or {}).items()]
            if st.sampled < p.min_tokens:
                ban += [(i, t) for t in p.stop_token_ids + ([] if p.ignore_eos else self.stop_ids)]
        if bias:
            r, t, v = zip(*bias)
            idx = h2d(torch.tensor([r, t]), self.device)
            logits.index_put_((idx[0], idx[1]), h2d(torch.tensor(v), self.device), accumulate=True)
        if ban:
            idx = h2d(torch.tensor(ban).T.contiguous(), self.device)
            logits[idx[0], idx[1]] = float("-inf")
        vals = [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty, p.min_p,
                 temps[i] or 1.0, st.slot, i] for i, st, p in zip(rows, states, ps)]  # fmt: skip
        packed = h2d(torch.tensor(vals, dtype=torch.float64), self.device)
        rep, freq, pres, min_p, temp = packed[:, :5].float().T[:, :, None]
        slots, idx = packed[:, 5].long(), packed[:, 6].long()
        self._rows = (slots, idx, states)
        if any(p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty for p in ps):
            sub, cnt = logits[idx], self.counts[slots].float()
            seen = (cnt > 0) | self.in_prompt[slots]
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
            logits[idx] = sub - freq * cnt - pres * (cnt > 0).float()
        if any(p.min_p for p in ps):
            sub = logits[idx]
            probs = torch.softmax(sub / temp, dim=-1)
            low = probs < min_p * probs.max(dim=-1, keepdim=True).values
            logits[idx] = sub.masked_fill(low, float("-inf"))
        return logits

    def _grammar_mask(self, logits: torch.Tensor, rows: list[int], states: list[_State]) -> None:
        g = [(i, st) for i, st in zip(rows, states) if st.matcher is not None]
        if not g:
            return
        import xgrammar as xgr

        if self.pending is not None:  # the previous grammar step's tokens, now on the host
            host, event, done = self.pending
            if event is not None:
                event.synchronize()
            for st, tok in zip(done, host.tolist()):
                st.matcher.accept_token(tok)  # False after termination: a step past the end
        vocab = logits.shape[-1]
        bitmask = xgr.allocate_token_bitmask(len(g), vocab)
        done = [j for j, (_, st) in enumerate(g) if st.matcher.is_terminated()]
        for j, (_, st) in enumerate(g):
            if j not in done:
                st.matcher.fill_next_token_bitmask(bitmask, j)
        bits = h2d(bitmask, self.device)
        shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
        allowed = ((bits[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
        if done:  # the grammar is complete: only a stop token may follow
            allowed[done] = False
            allowed[torch.tensor(done)[:, None], torch.tensor(self.stop_ids)[None]] = True
        idx = h2d(torch.tensor([i for i, _ in g]), self.device)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))

    def update(self, tokens: torch.Tensor) -> None:
        """Record the tokens just sampled for the rows of the last `apply`."""
        slots, idx, states = self._rows
        picked = tokens[idx]
        self.counts.index_put_((slots, picked), torch.ones_like(picked, dtype=torch.int32),
                               accumulate=True)  # fmt: skip
        for st in states:
            st.sampled += 1
        g = [j for j, st in enumerate(states) if st.matcher is not None]
        if g:
            sel, event = picked[h2d(torch.tensor(g), self.device)], None
            if sel.is_cuda:
                sel, event = sel.to("cpu", non_blocking=True), torch.cuda.Event()
                event.record()
            self.pending = (sel, event, [states[j] for j in g])
