"""RMSNorm, computed in float32 like the reference implementation."""

from __future__ import annotations

import torch
from torch import nn

from ..kernel.fused import fused_ops
from .linear import _param, default_loader


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), default_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fi = fused_ops(x)
        if fi is not None:
            shape = x.shape
            return fi.norm.rmsnorm(x.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused `residual += x; return norm(residual), residual`."""
        fi = fused_ops(x)
        if fi is not None:  # in place: residual += x, x = norm(residual)
            fi.norm.fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        residual = residual + x
        return self.forward(residual), residual
