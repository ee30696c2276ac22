"""Custom kernels with torch fallbacks. The CUDA versions (sources beside this file, e.g.
`store_kv.cu`) are JIT-compiled through apache-tvm-ffi on first use and used only for CUDA
tensors; CPU runs take the fallbacks."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from .. import env

log = logging.getLogger("minisgl.kernel")


@functools.cache
def _cuda_module():  # noqa: ANN202
    if env.disable_kernels():
        return None
    try:
        import tvm_ffi.cpp
    except ImportError:
        log.warning("apache-tvm-ffi not installed: using torch fallbacks for custom kernels")
        return None
    source = (Path(__file__).parent / "store_kv.cu").read_text()
    return tvm_ffi.cpp.load_inline("minisgl_kernels", cuda_sources=source, functions=["store_kv"])


def store_kv_torch(
    k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    k_buf[loc] = k
    v_buf[loc] = v


def store_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Scatter the new tokens' K/V (`[T, KV, D]`) into the pool at slots `loc` (`[T]`)."""
    mod = _cuda_module() if k.is_cuda else None
    if mod is None:
        store_kv_torch(k_buf, v_buf, loc, k, v)
    else:
        mod.store_kv(k_buf, v_buf, loc, k, v)
