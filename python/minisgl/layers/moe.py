"""Sparse mixture-of-experts block (Qwen3-MoE): a replicated softmax router picks the top-k
experts of each token; the experts are SwiGLU MLPs stored as two 3-D tensors, so one grouped
kernel runs them all. Tensor parallelism splits every expert's intermediate dimension (each
rank holds a slice of all experts) and ends with one all-reduce, like a dense MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, get_tp_info
from ..kernel.moe import fused_moe
from .linear import _param, default_loader


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = _param((num_experts, hidden), default_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """`gate_up_proj` [E, 2 I/tp, H] (this rank's gate rows, then its up rows) and `down_proj`
    [E, H, I/tp], the layout of transformers 5.x's fused experts; the loaders also take the
    hub's per-expert 2-D tensors (`experts.{e}.gate_proj.weight` ...)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.tp = get_tp_info()
        if intermediate % self.tp.size:
            raise ValueError(
                f"--tp {self.tp.size} must divide the experts' intermediate size {intermediate}"
            )
        self.local = intermediate // self.tp.size
        self.gate_up_proj = _param((num_experts, 2 * self.local, hidden), self.load_gate_up)
        self.down_proj = _param((num_experts, hidden, self.local), self.load_down)

    def _mine(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.tp.rank * self.local, self.local)

    def load_gate_up(
        self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None = None,
        expert: int | None = None,
    ) -> None:  # fmt: skip
        # fused [E, 2I, H] (gate, then up) or expert `expert`'s gate (shard 0) / up (1) [I, H]
        dst = param.data if expert is None else param.data[expert]
        parts = loaded.chunk(2, dim=-2) if shard is None else [loaded]
        for s, part in zip([0, 1] if shard is None else [shard], parts):
            default_loader(dst.narrow(-2, s * self.local, self.local), self._mine(part, -2))

    def load_down(
        self, param: torch.Tensor, loaded: torch.Tensor, expert: int | None = None
    ) -> None:
        dst = param.data if expert is None else param.data[expert]
        default_loader(dst, self._mine(loaded, -1))


class SparseMoeBlock(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, num_experts: int, top_k: int, norm_topk: bool
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in [1, {num_experts}]")
        self.top_k, self.norm_topk = top_k, norm_topk
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as transformers: softmax in float32, top-k, renormalised, rounded to the model dtype
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = fused_moe(
            x, self.experts.gate_up_proj, self.experts.down_proj, weights.to(x.dtype), ids
        )
        return all_reduce(out)
