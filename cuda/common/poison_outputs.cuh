// Tests' proof that kernels write every output element (PIT_DEBUG_POISON_OUTPUTS=1, see
// ffi_common.h): a CUDA handler fills its results with the poison byte on its stream first.
#pragma once

#include <cuda_runtime.h>

#include "ffi_common.h"

namespace pit {

// Each argument is a handler result (ffi::Result<ffi::Buffer<...>>); nothing runs unless poisoning is on.
template <typename... Results>
inline void poison_device_outputs(cudaStream_t stream, Results&... results) {
  if (!debug_poison_outputs()) return;
  (cudaMemsetAsync(results->untyped_data(), kPoisonByte, results->size_bytes(), stream), ...);
}

}  // namespace pit
