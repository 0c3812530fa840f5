// Calls a launcher with the CUDA element type of an FFI float dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "ffi_common.h"

namespace pit {

// launch(T{}) for bf16 / fp16 / fp32; *known = false (and nothing runs) for any other dtype.
template <typename Launch>
inline cudaError_t dispatch_dtype(ffi::DataType dtype, Launch&& launch, bool* known) {
  *known = true;
  switch (dtype) {
    case ffi::DataType::BF16: return launch(__nv_bfloat16{});
    case ffi::DataType::F16: return launch(__half{});
    case ffi::DataType::F32: return launch(float{});
    default: *known = false; return cudaSuccess;
  }
}

// dispatch_dtype for launchers that exist for the 16-bit (tensor-core) dtypes only: fp32 answers
// cudaErrorNotSupported without launching (the lowering never sends it there).
template <typename Launch>
inline cudaError_t dispatch_16bit_dtype(ffi::DataType dtype, Launch&& launch, bool* known) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    if constexpr (sizeof(tag) == 2) {
      return launch(tag);
    } else {
      return cudaErrorNotSupported;
    }
  }, known);
}

// A handler's answer after dispatch_dtype: the dtype error, the launch's CUDA error, or success.
inline ffi::Error dispatch_outcome(const char* op, bool known, cudaError_t err) {
  if (!known) return ffi::Error::InvalidArgument(std::string(op) + ": x must be bfloat16, float16 or float32");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string(op) + ": " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace pit
