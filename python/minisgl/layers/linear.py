"""Tensor-parallel linear layers. Each parameter carries a `weight_loader` that copies this
rank's shard out of a full checkpoint tensor, so loading needs no per-model slicing code."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, get_tp_info


def _param(shape: tuple[int, ...], loader: Callable[..., None]) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def default_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; several logical outputs (q/k/v,
    gate/up) may be fused into one GEMM, each sharded separately."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.tp = get_tp_info()
        self.local_sizes = [self.shard_size(i, s) for i, s in enumerate(out_sizes)]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(out_sizes))]
        out = sum(self.local_sizes)
        self.weight = _param((out, in_features), self.load)
        self.bias = _param((out,), self.load) if bias else None

    def shard_size(self, shard: int, full: int) -> int:
        if full % self.tp.size:
            raise ValueError(f"output size {full} is not divisible by tp={self.tp.size}")
        return full // self.tp.size

    def shard_start(self, shard: int, local: int) -> int:
        return self.tp.rank * local

    def load(self, param: torch.Tensor, loaded: torch.Tensor, shard: int = 0) -> None:
        local = self.local_sizes[shard]
        part = loaded.narrow(0, self.shard_start(shard, local), local)
        default_loader(param.data.narrow(0, self.offsets[shard], local), part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; KV heads are replicated when there are fewer than ranks."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        super().__init__(
            hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias
        )

    def shard_size(self, shard: int, full: int) -> int:
        if shard == 0 or self.num_kv_heads >= self.tp.size:
            return super().shard_size(shard, full)
        return self.head_dim  # one replicated KV head per rank

    def shard_start(self, shard: int, local: int) -> int:
        if shard == 0 or self.num_kv_heads >= self.tp.size:
            return super().shard_start(shard, local)
        ranks_per_head = self.tp.size // self.num_kv_heads
        return (self.tp.rank // ranks_per_head) * self.head_dim


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks, then one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = get_tp_info()
        if in_features % self.tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tp={self.tp.size}")
        self.local_in = in_features // self.tp.size
        self.weight = _param((out_features, self.local_in), self.load)
        self.bias = _param((out_features,), default_loader) if bias else None

    def load(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        default_loader(param, loaded.narrow(1, self.tp.rank * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
