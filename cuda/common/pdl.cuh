// Programmatic dependent launch (Hopper): a kernel launched with launch_dependent may be
// scheduled before the previous kernel on the stream has finished, hiding the launch gap between
// two kernels. Such a kernel must call wait_for_previous_grid in every thread before it touches
// global memory (it returns once the previous grid has finished and its writes are visible); it
// may call allow_dependent_launch to let the next dependent kernel be scheduled once all of its
// own CTAs are running. Every CTA waits, so a chain of dependent kernels stays ordered end to
// end. Both calls are no-ops before sm_90, and launch_dependent is a plain launch there.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

#include "device_query.cuh"

namespace pit {

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether this process's device takes programmatic dependent launches (compute capability 9+).
inline bool dependent_launch_supported() {
  static const bool supported = [] {
    int major = 0;
    return current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major) == cudaSuccess && major >= 9;
  }();
  return supported;
}

// The environment variable `name` read per launch (an A/B switch); 1 (dependent launches on) when unset.
inline int dependent_launch_setting(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr ? 1 : std::atoi(env);
}

// Launches kernel with programmatic stream serialisation where supported and `dependent` holds
// (the kernel must call wait_for_previous_grid first); a plain stream-ordered launch otherwise.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                             cudaStream_t stream, bool dependent, Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = dependent && dependent_launch_supported() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace pit
