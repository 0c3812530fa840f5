// The current CUDA device's attributes, read where a handler or launcher picks a path or a grid.
#pragma once

#include <cuda_runtime.h>

namespace pit {

// attr (compute capability, SM count, ...) of the calling thread's current device, into *value.
inline cudaError_t current_device_attribute(cudaDeviceAttr attr, int* value) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err == cudaSuccess ? cudaDeviceGetAttribute(value, attr, device) : err;
}

}  // namespace pit
