// Calls a launcher with the CUDA element type of an FFI float dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

}  // namespace pit
