"""Custom kernels with torch fallbacks. The CUDA versions are JIT-compiled through
apache-tvm-ffi on first use and used only for CUDA tensors; CPU runs take the fallbacks."""

from __future__ import annotations

import functools
import logging

import torch

from .. import env

log = logging.getLogger("minisgl.kernel")

_STORE_KV_CUDA = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <cuda_runtime.h>

// One block per token: copy its K row and V row (kv_heads * head_dim elements) into the pool
// slot loc[t]. Rows are moved as 16-byte words; rows of every supported shape are multiples.
__global__ void store_kv_kernel(uint4* __restrict__ kbuf, uint4* __restrict__ vbuf,
                                const int64_t* __restrict__ loc, const uint4* __restrict__ k,
                                const uint4* __restrict__ v, int64_t words, int64_t k_stride,
                                int64_t v_stride) {
  const int64_t t = blockIdx.x;
  const int64_t dst = loc[t] * words;
  const uint4* ks = k + t * k_stride;
  const uint4* vs = v + t * v_stride;
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
    kbuf[dst + i] = ks[i];
    vbuf[dst + i] = vs[i];
  }
}

void store_kv(tvm::ffi::TensorView kbuf, tvm::ffi::TensorView vbuf, tvm::ffi::TensorView loc,
              tvm::ffi::TensorView k, tvm::ffi::TensorView v) {
  const int64_t tokens = loc.size(0);
  if (tokens == 0) return;
  const int64_t elem = (k.dtype().bits + 7) / 8;
  const int64_t row_bytes = k.size(1) * k.size(2) * elem;
  TVM_FFI_ICHECK(row_bytes % 16 == 0) << "K/V rows must be a multiple of 16 bytes";
  TVM_FFI_ICHECK(k.stride(2) == 1 && k.stride(1) == k.size(2)) << "K rows must be dense";
  TVM_FFI_ICHECK(v.stride(2) == 1 && v.stride(1) == v.size(2)) << "V rows must be dense";
  TVM_FFI_ICHECK((k.stride(0) * elem) % 16 == 0 && (v.stride(0) * elem) % 16 == 0) << "row strides";
  const int64_t words = row_bytes / 16;
  const int threads = words < 256 ? static_cast<int>(words) : 256;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(k.device().device_type, k.device().device_id));
  store_kv_kernel<<<tokens, threads, 0, stream>>>(
      static_cast<uint4*>(kbuf.data_ptr()), static_cast<uint4*>(vbuf.data_ptr()),
      static_cast<const int64_t*>(loc.data_ptr()), static_cast<const uint4*>(k.data_ptr()),
      static_cast<const uint4*>(v.data_ptr()), words, k.stride(0) * elem / 16, v.stride(0) * elem / 16);
}
"""


@functools.cache
def _cuda_module():  # noqa: ANN202
    if env.disable_kernels():
        return None
    try:
        import tvm_ffi.cpp
    except ImportError:
        log.warning("apache-tvm-ffi not installed: using torch fallbacks for custom kernels")
        return None
    return tvm_ffi.cpp.load_inline(
        "minisgl_kernels", cuda_sources=_STORE_KV_CUDA, functions=["store_kv"]
    )


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
