// Shared by the CUTLASS probes (grouped_probe.cu: the forward; dw_probe.cu: dW): the grouped GEMM
// type over CUTLASS's Hopper ptr-array kernels, a device fill and an event timer.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

#define CHECK_CUDA(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); std::exit(1); } } while (0)
#define CHECK_CUTLASS(x) do { cutlass::Status s_ = (x); if (s_ != cutlass::Status::kSuccess) { \
  std::printf("CUTLASS error %s at %s:%d\n", cutlassGetStatusString(s_), __FILE__, __LINE__); return -1.0; } } while (0)

using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per expert
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlign = 8;

template <class Tile, class Cluster, class Mainloop, class Epilogue, class LayoutA, class LayoutB>
struct GroupedGemm {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign, Epilogue,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      Mainloop>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using CoopMain = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
using PingMain = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;

__global__ void fill_random(Element* p, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = Element((int(h & 1023) - 512) / 512.0f);
  }
}

// ms per call over 20 calls after 3 warm-ups; call() returns a cutlass::Status.
template <class Call>
double time_calls(Call call) {
  for (int i = 0; i < 3; ++i) CHECK_CUTLASS(call());
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  const int iters = 20;
  cudaEventRecord(t0);
  for (int i = 0; i < iters; ++i) CHECK_CUTLASS(call());
  cudaEventRecord(t1);
  CHECK_CUDA(cudaEventSynchronize(t1));
  float ms = 0;
  cudaEventElapsedTime(&ms, t0, t1);
  return ms / iters;
}
