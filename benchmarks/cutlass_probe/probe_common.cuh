// Shared by the CUTLASS probes (grouped_probe.cu and layer_shapes_probe.cu: the forward; dw_probe.cu:
// dW): the grouped GEMM type over CUTLASS's Hopper ptr-array kernels, a device fill, an event timer
// and the forward's per-expert arguments.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

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

// count random bf16 values on the device (seeded), with a host copy for the reference.
inline Element* device_random(size_t count, uint32_t seed, std::vector<Element>* host) {
  Element* p;
  CHECK_CUDA(cudaMalloc(&p, count * sizeof(Element)));
  fill_random<<<1024, 256>>>(p, int64_t(count), seed);
  host->resize(count);
  CHECK_CUDA(cudaMemcpy(host->data(), p, count * sizeof(Element), cudaMemcpyDeviceToHost));
  return p;
}

// The group starts (prefix sums of counts) on the host and the device.
inline int* device_starts(const std::vector<int>& counts, std::vector<int>* starts) {
  starts->assign(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) (*starts)[e + 1] = (*starts)[e] + counts[e];
  int* d;
  CHECK_CUDA(cudaMalloc(&d, starts->size() * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(d, starts->data(), starts->size() * sizeof(int), cudaMemcpyHostToDevice));
  return d;
}

// A forward case's operands: the group starts of the per-expert counts (host and device), x [rows,
// k] and w [experts, k·n] random on the device (seeds 11 and 23, host copies for the references)
// and out [rows, n]; freed on destruction.
struct ForwardOperands {
  std::vector<int> starts;
  std::vector<Element> hx, hw;
  int* d_starts = nullptr;
  Element *x = nullptr, *w = nullptr, *out = nullptr;

  ForwardOperands(const std::vector<int>& counts, int rows, int k, int n) {
    d_starts = device_starts(counts, &starts);
    x = device_random(size_t(rows) * k, 11, &hx);
    w = device_random(counts.size() * size_t(k) * n, 23, &hw);
    CHECK_CUDA(cudaMalloc(&out, size_t(rows) * n * sizeof(Element)));
  }
  ForwardOperands(const ForwardOperands&) = delete;
  ForwardOperands& operator=(const ForwardOperands&) = delete;
  ~ForwardOperands() {
    for (void* p : {(void*)x, (void*)w, (void*)out, (void*)d_starts}) cudaFree(p);
  }
};

// A grouped GEMM over per-expert arrays in device memory: sizes and pointers (written by a kernel
// before each call, sizes on the device only), strides (the same for every expert) and the
// workspace; freed on destruction.
template <class Gemm>
struct GroupedSetup {
  using StrideA = typename Gemm::GemmKernel::InternalStrideA;
  using StrideB = typename Gemm::GemmKernel::InternalStrideB;
  using StrideD = typename Gemm::GemmKernel::InternalStrideD;
  ProblemShape::UnderlyingProblemShape* shapes = nullptr;
  const Element** a = nullptr;
  const Element** b = nullptr;
  Element** d = nullptr;
  StrideA* sa = nullptr;
  StrideB* sb = nullptr;
  StrideD* sd = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int max_swizzle = 1;  // the tile scheduler's swizzle (CUTLASS's default 1), set before init
  Gemm gemm;

  // false, after saying why, where CUTLASS refuses the problem.
  bool init(int experts, StrideA stride_a, StrideB stride_b, StrideD stride_d) {
    CHECK_CUDA(cudaMalloc(&shapes, experts * sizeof(*shapes)));
    CHECK_CUDA(cudaMalloc(&a, experts * sizeof(void*)));
    CHECK_CUDA(cudaMalloc(&b, experts * sizeof(void*)));
    CHECK_CUDA(cudaMalloc(&d, experts * sizeof(void*)));
    copy_replicated(&sa, stride_a, experts);
    copy_replicated(&sb, stride_b, experts);
    copy_replicated(&sd, stride_d, experts);
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = 0;
    hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped, {experts, shapes, nullptr},
                                  {a, sa, b, sb}, {{}, nullptr, sd, d, sd}, hw_info};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.scheduler.max_swizzle_size = max_swizzle;
    workspace_bytes = Gemm::get_workspace_size(args);
    if (workspace_bytes) CHECK_CUDA(cudaMalloc(&workspace, workspace_bytes));
    cutlass::Status st = gemm.can_implement(args);
    if (st == cutlass::Status::kSuccess) st = gemm.initialize(args, workspace);
    if (st != cutlass::Status::kSuccess) std::printf("CUTLASS error %s\n", cutlassGetStatusString(st));
    return st == cutlass::Status::kSuccess;
  }

  ~GroupedSetup() {
    for (void* p : {(void*)shapes, (void*)a, (void*)b, (void*)d, (void*)sa, (void*)sb, (void*)sd, workspace})
      if (p) cudaFree(p);
  }

 private:
  template <class Stride>
  static void copy_replicated(Stride** dst, Stride value, int experts) {
    std::vector<Stride> host(experts, value);
    CHECK_CUDA(cudaMalloc(dst, experts * sizeof(Stride)));
    CHECK_CUDA(cudaMemcpy(*dst, host.data(), experts * sizeof(Stride), cudaMemcpyHostToDevice));
  }
};

// Forward probes (grouped_probe.cu, layer_shapes_probe.cu), one thread per expert: problem sizes and
// pointers from the group starts; x and out rows in routing order, w[e] of K·N elements in either major.
__global__ void write_group_args(const int* starts, int experts, int n, int k, const Element* x, const Element* w,
                                 Element* out, ProblemShape::UnderlyingProblemShape* shapes, const Element** a_ptrs,
                                 const Element** b_ptrs, Element** d_ptrs) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  shapes[e] = {starts[e + 1] - starts[e], n, k};
  a_ptrs[e] = x + static_cast<int64_t>(starts[e]) * k;
  b_ptrs[e] = w + static_cast<int64_t>(e) * k * n;
  d_ptrs[e] = out + static_cast<int64_t>(starts[e]) * n;
}

// A forward grouped GEMM's setup: packed strides for row-major A and D ([rows, k], [rows, n]) and
// B of n x k in the GEMM's own major; false (said why) where CUTLASS refuses the problem.
template <class Setup>
bool init_forward(Setup& g, int experts, int n, int k) {
  return g.init(experts, cutlass::make_cute_packed_stride(typename Setup::StrideA{}, {1, k, 1}),
                cutlass::make_cute_packed_stride(typename Setup::StrideB{}, {n, k, 1}),
                cutlass::make_cute_packed_stride(typename Setup::StrideD{}, {1, n, 1}));
}

// Poisons out's count elements (all bits set: NaN in bf16), runs call once and copies out back into
// host; false, after saying so, where CUTLASS refuses the call.
template <class Call>
bool run_poisoned(Element* out, size_t count, Call call, std::vector<Element>* host) {
  CHECK_CUDA(cudaMemset(out, 0xff, count * sizeof(Element)));
  const cutlass::Status st = call();
  if (st != cutlass::Status::kSuccess) {
    std::printf("CUTLASS error %s\n", cutlassGetStatusString(st));
    return false;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  host->resize(count);
  CHECK_CUDA(cudaMemcpy(host->data(), out, count * sizeof(Element), cudaMemcpyDeviceToHost));
  return true;
}

// The expert whose routing-order rows [starts[e], starts[e + 1]) hold row.
inline int expert_of(const std::vector<int>& starts, int row) {
  return int(std::upper_bound(starts.begin(), starts.end(), row) - starts.begin()) - 1;
}

// The worst relative error so far, |got - want| / (1 + |want|), NaN counting as 1e9.
inline void track_error(double got, double want, double* worst) {
  const double err = std::abs(got - want) / (1.0 + std::abs(want));
  if (!(err <= *worst)) *worst = std::isnan(err) ? 1e9 : err;
}
