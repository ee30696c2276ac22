"""FlashInfer's fused RMSNorm / add+RMSNorm / SiLU-and-mul / RoPE for 16-bit CUDA tensors.

Each replaces a chain of small torch kernels (the profile of a decode step is dominated by
them after attention); CPU and float32 keep the torch code, which the GPU tests compare to."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .. import env


@functools.cache
def _flashinfer() -> ModuleType | None:
    if env.disable_fused():
        return None
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def fused_ops(x: torch.Tensor, multiple: int = 8) -> ModuleType | None:
    """FlashInfer when `x` can use its kernels, else None (take the torch path). The kernels
    move 16-byte vectors, so the last dimension must be a multiple of 8 (or of `multiple`)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] % multiple:
        return None
    return _flashinfer()
