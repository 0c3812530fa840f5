// Host side: opting a kernel in to more than 48 KB of dynamic shared memory.
#pragma once

#include <cuda_runtime.h>

namespace pit {

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KB needs opting in).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace pit
