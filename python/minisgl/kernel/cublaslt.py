"""16-bit GEMMs (`y = x @ w.T`, float32 accumulation) through cuBLASLt, for two reasons:
- torch asks cuBLAS's heuristic again for every new row count, 1-4 ms of host time per shape
  (measured on the H100); prefill row counts rarely repeat, and each query left the GPU idle.
  Here row counts share a bucket (up to 256: the decode-graph sizes; above: multiples of
  512) whose candidate list is queried once.
- for the decode buckets `tune` times the candidates on the model's own weights and keeps the
  fastest, instead of the heuristic's first guess.
JIT-compiled through apache-tvm-ffi like the other CUDA kernels; F.linear wherever it is absent
(CPU, float32, bias, MINISGL_DISABLE_LT=1)."""

from __future__ import annotations

import functools
import glob
import logging
import os
import sys

import torch

log = logging.getLogger("minisgl.kernel")

_SRC = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <map>
#include <tuple>
#include <vector>

#define LT_CHECK(x) do { cublasStatus_t s_ = (x); \
  TVM_FFI_ICHECK(s_ == CUBLAS_STATUS_SUCCESS) << #x << " failed with status " << int(s_); } while (0)

namespace {
cublasLtHandle_t lt_handle() {
  static cublasLtHandle_t h = [] { cublasLtHandle_t h; LT_CHECK(cublasLtCreate(&h)); return h; }();
  return h;
}

// Row-major y[m, n] = x[m, k] w[n, k]^T is column-major y^T[n, m] = (w^T)^T[n, k] x^T[k, m].
struct Layouts {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t w, x, y;
  std::map<std::pair<int64_t, int64_t>, bool> usable;  // (bucket, algo) -> algo runs this m
};
using Key = std::tuple<int64_t, int64_t, int64_t, int>;  // m, n, k, dtype
std::map<Key, Layouts> layouts;
std::map<Key, std::vector<cublasLtMatmulHeuristicResult_t>> candidates;  // keyed by bucket

cudaDataType_t dtype_of(const tvm::ffi::TensorView& t) {
  TVM_FFI_ICHECK(t.dtype().bits == 16) << "16-bit tensors only";
  return t.dtype().code == kDLBfloat ? CUDA_R_16BF : CUDA_R_16F;
}

Layouts& layouts_for(const Key& key) {
  auto it = layouts.find(key);
  if (it != layouts.end()) return it->second;
  auto [m, n, k, dt] = key;
  Layouts l;
  LT_CHECK(cublasLtMatmulDescCreate(&l.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  LT_CHECK(cublasLtMatrixLayoutCreate(&l.w, cudaDataType_t(dt), k, n, k));
  LT_CHECK(cublasLtMatrixLayoutCreate(&l.x, cudaDataType_t(dt), k, m, k));
  LT_CHECK(cublasLtMatrixLayoutCreate(&l.y, cudaDataType_t(dt), n, m, n));
  return layouts.emplace(key, std::move(l)).first->second;
}

// The heuristic's candidates for a bucket of m: queried once (~1-4 ms each, which is why
// torch's per-shape query stalls the host for every new prefill length).
std::vector<cublasLtMatmulHeuristicResult_t>& candidates_for(const Key& bucket, uint64_t ws) {
  auto it = candidates.find(bucket);
  if (it != candidates.end()) return it->second;
  Layouts& l = layouts_for(bucket);
  cublasLtMatmulPreference_t pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  std::vector<cublasLtMatmulHeuristicResult_t> found(16);
  int n = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(lt_handle(), l.desc, l.w, l.x, l.y, l.y, pref, 16,
                                          found.data(), &n));
  cublasLtMatmulPreferenceDestroy(pref);
  TVM_FFI_ICHECK(n > 0) << "cuBLASLt has no algorithm for this GEMM";
  found.resize(n);
  return candidates.emplace(bucket, std::move(found)).first->second;
}
}  // namespace

int64_t lt_num_algos(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView ws,
                     int64_t bucket) {
  return candidates_for(Key(bucket, w.size(0), x.size(1), dtype_of(x)), ws.size(0)).size();
}

// y = x w^T with candidate `algo` of m's bucket; an algorithm that cannot run this exact m
// (checked once per m) falls back to the heuristic's first choice for m itself.
void lt_gemm(tvm::ffi::TensorView y, tvm::ffi::TensorView x, tvm::ffi::TensorView w,
             tvm::ffi::TensorView ws, int64_t bucket, int64_t algo) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TVM_FFI_ICHECK(w.size(1) == k && y.size(0) == m && y.size(1) == n && bucket >= m) << "shapes";
  TVM_FFI_ICHECK(x.stride(1) == 1 && x.stride(0) == k && w.stride(1) == 1 && w.stride(0) == k &&
                 y.stride(1) == 1 && y.stride(0) == n) << "dense row-major tensors only";
  const int dt = dtype_of(x);
  const uint64_t ws_bytes = ws.size(0);
  auto& cands = candidates_for(Key(bucket, n, k, dt), ws_bytes);
  TVM_FFI_ICHECK(algo >= 0 && algo < int64_t(cands.size())) << "no algorithm " << algo;
  Layouts& l = layouts_for(Key(m, n, k, dt));
  const cublasLtMatmulAlgo_t* chosen = &cands[algo].algo;
  if (bucket != m) {
    auto u = l.usable.find({bucket, algo});
    if (u == l.usable.end()) {
      cublasLtMatmulHeuristicResult_t r;
      bool ok = cublasLtMatmulAlgoCheck(lt_handle(), l.desc, l.w, l.x, l.y, l.y, chosen, &r) ==
                    CUBLAS_STATUS_SUCCESS && r.workspaceSize <= ws_bytes;
      u = l.usable.emplace(std::make_pair(bucket, algo), ok).first;
    }
    if (!u->second) chosen = &candidates_for(Key(m, n, k, dt), ws_bytes)[0].algo;
  }
  const float alpha = 1.0f, beta = 0.0f;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(x.device().device_type, x.device().device_id));
  LT_CHECK(cublasLtMatmul(lt_handle(), l.desc, &alpha, w.data_ptr(), l.w, x.data_ptr(), l.x, &beta,
                          y.data_ptr(), l.y, y.data_ptr(), l.y, chosen, ws.data_ptr(), ws_bytes,
                          stream));
}
"""


def _find(patterns: list[str]) -> str | None:
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True))
        if hits:
            return hits[0]
    return None


def _loaded_cublaslt() -> str | None:
    """The libcublasLt torch has loaded (linking against that one keeps versions in step)."""
    torch.zeros(1, device="cuda") @ torch.zeros(1, 1, device="cuda")  # loads cuBLAS(Lt)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcublasLt.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


@functools.cache
def module():  # noqa: ANN201
    """The compiled module, or None (no tvm-ffi, no cuBLASLt header, or kernels disabled)."""
    if os.environ.get("MINISGL_DISABLE_KERNELS") or os.environ.get("MINISGL_DISABLE_LT"):
        return None
    try:
        import tvm_ffi.cpp
    except ImportError:
        return None
    roots = [os.environ.get("CUDA_HOME", "/usr/local/cuda"), "/usr/local/cuda"]
    roots += [
        os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))
    ]
    header = _find(
        [f"{r}/include/cublasLt.h" for r in roots] + [f"{r}/**/include/cublasLt.h" for r in roots]
    )
    lib = _loaded_cublaslt()
    if header is None or lib is None:
        log.warning("cuBLASLt header or library not found: decode GEMMs stay on torch's choice")
        return None
    return tvm_ffi.cpp.load_inline(
        "minisgl_cublaslt", cuda_sources=_SRC, functions=["lt_num_algos", "lt_gemm"],
        extra_include_paths=[os.path.dirname(header)], extra_ldflags=[lib],
    )  # fmt: skip


_WORKSPACE_BYTES = 32 << 20
_workspaces: dict[torch.device, torch.Tensor] = {}
# (bucket, n, k, dtype) -> index of the fastest candidate; shared by every engine in the
# process, so an eager and a graph engine on the same model run the same kernels
_choice: dict[tuple[int, int, int, torch.dtype], int] = {}


def bucket(m: int) -> int:
    if m <= 8:
        return 1 << (m - 1).bit_length()
    return -(-m // 16) * 16 if m <= 256 else -(-m // 512) * 512


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.dtype == w.dtype
        and x.dim() == 2
        and x.shape[0] > 0
        and x.is_contiguous()
        and w.is_contiguous()
        and module() is not None
    )


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if bias is not None or not usable(x, w):
        return torch.nn.functional.linear(x, w, bias)
    m, (n, k) = x.shape[0], w.shape
    b = bucket(m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    module().lt_gemm(y, x, w, _workspace(x.device), b, _choice.get((b, n, k, x.dtype), 0))
    return y


def tune(weights: list[torch.Tensor], buckets: list[int]) -> bool:
    """For each bucket, time every candidate over `weights` (same shape: one per layer, so each
    call reads its weight from memory, as in a decode step) and keep the fastest."""
    w0 = weights[0]
    x_full = torch.randn(max(buckets), w0.shape[1], dtype=w0.dtype, device=w0.device)
    if not usable(x_full, w0):
        return False
    mod, ws = module(), _workspace(w0.device)
    for b in buckets:
        key = (b, *w0.shape, w0.dtype)
        if key in _choice:
            continue
        x = x_full[:b]
        y = torch.empty(b, w0.shape[0], dtype=w0.dtype, device=w0.device)
        times = []
        for algo in range(mod.lt_num_algos(x, w0, ws, b)):
            mod.lt_gemm(y, x, w0, ws, b, algo)  # warm-up
            best = float("inf")
            for _ in range(2):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for w in weights:
                    mod.lt_gemm(y, x, w, ws, b, algo)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end))
            times.append((best, algo))
        _choice[key] = min(times)[1]
    return True


def tune_model(model: torch.nn.Module, max_bs: int) -> bool:
    """Tune the decode buckets up to `max_bs` for every weight shape of `model`'s linears."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.dim() == 2:
            by_shape.setdefault((tuple(p.shape), p.dtype), []).append(p.data)
    buckets = sorted({bucket(m) for m in range(1, max_bs + 1)})
    return all([tune(weights, buckets) for weights in by_shape.values()])
