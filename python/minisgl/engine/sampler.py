"""Token sampling on the device: greedy, temperature, top-k, top-p and per-request seeds, all
rows of a batch at once and without host synchronisation."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..core import Req
from ..kernel import triton_ops
from ..utils import h2d
from .logits import LogitsProcessor


def top_k_top_p(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the top-k, then outside the smallest nucleus of mass top-p
    (computed on the renormalised top-k distribution); at least one token survives."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.where(top_ks < 0, vocab, top_ks)[:, None]
    sorted_p = sorted_p.masked_fill(ranks >= k, 0.0)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    # mass strictly before a token already reaches top_p -> the token is outside the nucleus
    before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill((before >= top_ps[:, None]) & (top_ps[:, None] < 1.0), 0.0)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def sample(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
    generator: torch.Generator | None = None, seeded: list[tuple[int, int]] | None = None,
    needs_filter: bool = True,
) -> torch.Tensor:  # fmt: skip
    """One token per row. Rows with temperature 0 are greedy. `seeded` lists (row, rng seed)
    pairs whose noise comes from their own generator, so they do not depend on the batch."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    t = torch.where(temperatures > 0, temperatures, 1.0)
    probs = torch.softmax(logits / t[:, None], dim=-1)
    if needs_filter:
        probs = top_k_top_p(probs, top_ks, top_ps)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, seed in seeded or ():
        gen = torch.Generator(device=probs.device).manual_seed(seed)
        noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperatures > 0, sampled, greedy)


@dataclass
class SamplingInfo:
    """Per-batch sampling parameters, built on the host once per batch. The device tensors
    are copied on first use: a decode graph samples from host-packed values and needs none."""

    device: str
    temps_host: list[float]
    top_ks_host: list[float]
    top_ps_host: list[float]
    seeded: list[tuple[int, int]]  # (row, generator seed) for rows with a request seed
    needs_filter: bool
    all_greedy: bool
    logprob_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, top-n)
    reqs: list[Req] = field(default_factory=list)
    needs_processing: bool = False  # a row has penalties, min_p, logit_bias, ... (logits.py)

    @classmethod
    def build(cls, reqs: list[Req], positions: list[int], device: str) -> SamplingInfo:
        ps = [r.params for r in reqs]
        temps = [0.0 if p.top_k == 1 else p.temperature for p in ps]
        return cls(
            device=device,
            temps_host=temps,
            top_ks_host=[float(p.top_k) for p in ps],
            top_ps_host=[p.top_p for p in ps],
            seeded=[
                (i, _mix(p.seed, pos))
                for i, (p, pos) in enumerate(zip(ps, positions))
                if p.seed is not None and temps[i] > 0
            ],
            needs_filter=any(p.top_k > 1 or p.top_p < 1.0 for p in ps),
            all_greedy=all(t == 0 for t in temps),
            logprob_rows=[(i, p.logprobs) for i, p in enumerate(ps) if p.logprobs >= 0],
            reqs=list(reqs),
            needs_processing=any(p.needs_processing for p in ps),
        )

    @functools.cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperatures, top-k as int64, top-p) on the device, in one copy."""
        vals = torch.tensor([self.temps_host, self.top_ks_host, self.top_ps_host])
        t, k, p = h2d(vals.float(), self.device)
        return t, k.long(), p

    @functools.cached_property
    def seed_rows_vals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Device copies of `seeded` (rows, 31-bit seeds) for the sampling kernel."""
        if not self.seeded:
            return None
        packed = torch.tensor([[i for i, _ in self.seeded], [s % 2**31 for _, s in self.seeded]])
        packed = h2d(packed, self.device)
        return packed[0], packed[1].int()


def _mix(seed: int, step: int) -> int:
    """A per-(seed, position) generator seed: reproducible whatever else is in the batch."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77) % (2**63 - 1)


class Sampler:
    def __init__(self, device: str, seed: int, stop_ids: list[int] | tuple = ()) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.processor = LogitsProcessor(device, list(stop_ids))

    def __call__(self, logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
        if not info.needs_processing:
            return self._sample(logits, info)
        tokens = self._sample(self.processor.apply(logits, info.reqs, info.temps_host), info)
        self.processor.update(tokens)
        return tokens

    def _sample(self, logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
        if info.all_greedy:
            return logits.argmax(dim=-1)
        if triton_ops.available(logits):
            return self._fused(logits, info)
        t, k, p = info.tensors
        return sample(logits, t, k, p, self.generator, info.seeded, info.needs_filter)

    def _fused(self, logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
        """One pass over the logits (Gumbel-max in a Triton kernel). Rows with top-k/top-p take
        the torch path; the choice depends on the row alone, so a seeded request gets the same
        tokens whatever shares its batch."""
        seeds = torch.randint(
            2**31 - 1, (logits.shape[0],), generator=self.generator, device=logits.device,
            dtype=torch.int32,
        )  # fmt: skip
        if info.seed_rows_vals is not None:
            rows, vals = info.seed_rows_vals
            seeds[rows] = vals
        t, k, p = info.tensors
        tokens = triton_ops.gumbel_sample(logits, t, seeds)
        if info.needs_filter:
            filtered = sample(logits, t, k, p, self.generator, info.seeded)
            tokens = torch.where((k > 1) | (p < 1.0), filtered, tokens)
        return tokens


def gather_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[tuple[int, int]]
) -> tuple:
    """(chosen logprob [R], top values [R, n], top ids [R, n]) for the requested rows."""
    idx = h2d(torch.tensor([r for r, _ in rows]), str(logits.device.type))
    n = max(k for _, k in rows)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    chosen = lp.gather(-1, tokens[idx].unsqueeze(-1)).squeeze(-1)
    top = lp.topk(max(n, 1), dim=-1)
    return chosen, top.values, top.indices
