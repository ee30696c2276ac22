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
