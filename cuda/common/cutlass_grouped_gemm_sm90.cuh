// CUTLASS's Hopper grouped GEMM (ptr-array, TMA, warp-specialised cooperative 128x256x64 tiles,
// persistent) with its per-problem sizes, pointers and strides written on the device, so nothing
// waits for the host. Shared by the staged MoE kernels (cuda/moe/moe_staged_sm90.cu) and k-gather's
// gated dense dW (cuda/kgather/kgather_dw_dense_sm90.cu). sm_90a only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "device_query.cuh"

namespace pit {

// Bytes of the args section per problem (StagedArgs below).
constexpr int64_t kGroupedGemmArgsBytesPerProblem = 256;

namespace {

using StagedProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per problem

using StagedTile = cute::Shape<cute::_128, cute::_256, cute::_64>;
using StagedCluster = cute::Shape<cute::_1, cute::_1, cute::_1>;  // 2-CTA clusters measured slower on uniform routing
constexpr int kAlign = 8;                                         // 16-byte rows: d and f multiples of 8

// CUTLASS's Hopper grouped GEMM with the given epilogue collective, A and B in the given layouts
// (16-bit: either major).
template <typename Element, typename LayoutA, typename LayoutB, typename Epilogue_>
struct GroupedGemmWith {
  using Epilogue = Epilogue_;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, StagedTile, StagedCluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<StagedProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using EpilogueArguments = typename Kernel::EpilogueArguments;
};

// D row-major through CUTLASS's TMA epilogue (per-expert D pointers).
template <typename Element, typename LayoutA, typename LayoutB>
using StagedGemm = GroupedGemmWith<
    Element, LayoutA, LayoutB,
    typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, StagedTile, StagedCluster,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor*, kAlign,
        Element, cutlass::layout::RowMajor*, kAlign, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
        cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp>;

// dW-shaped products: D = Aᵀ B with A [K', M] and B [K', N] row-major (M = A's columns, N = B's
// columns, K' their shared rows), so Aᵀ is M-major and B N-major: MoE's dw[e] = x_eᵀ dy_e and
// k-gather's dense dW = xᵀ dy.
template <typename Element>
using TnGemm = StagedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// The grouped GEMM's per-problem arguments inside the workspace's args section (MoE dW: one problem per expert).
template <typename G>
struct StagedArgs {
  using Element = typename G::Gemm::ElementA;
  StagedProblemShape::UnderlyingProblemShape* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  int32_t* row_starts;  // each problem's first routing-order row (the scatter epilogue's)

  StagedArgs(uint8_t* base, int64_t problems) {
    auto take = [&](auto*& p, int64_t bytes_each) {
      p = reinterpret_cast<std::remove_reference_t<decltype(p)>>(base);
      base += problems * bytes_each;
    };
    take(shapes, 16);
    take(a, 8);
    take(b, 8);
    take(d, 8);
    take(stride_a, 32);
    take(stride_b, 32);
    take(stride_d, 32);
    take(row_starts, 4);
  }
  static_assert(sizeof(StagedProblemShape::UnderlyingProblemShape) <= 16 && sizeof(typename G::StrideA) <= 32 &&
                    sizeof(typename G::StrideB) <= 32 && sizeof(typename G::StrideD) <= 32,
                "per-problem arguments exceed their slots");
  static_assert(16 + 3 * 8 + 3 * 32 + 4 <= kGroupedGemmArgsBytesPerProblem, "args section too small");
};

// The epilogue arguments of a StagedGemm: D through the per-expert pointers and strides.
template <typename G>
typename G::EpilogueArguments tma_store_arguments(const StagedArgs<G>& args) {
  typename G::EpilogueArguments epilogue{{}, nullptr, args.stride_d, args.d, args.stride_d};
  epilogue.thread.alpha = 1.0f;
  epilogue.thread.beta = 0.0f;
  return epilogue;
}

// The grouped GEMM over the per-expert arguments a device kernel wrote (sizes on the device only).
template <typename G>
std::string run_grouped_gemm(cudaStream_t stream, const StagedArgs<G>& args, int64_t problems, uint8_t* workspace,
                             int64_t workspace_bytes, const typename G::EpilogueArguments& epilogue) {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  current_device_attribute(cudaDevAttrMultiProcessorCount, &hw.sm_count);  // stays 0 if unreadable
  typename G::Gemm::Arguments gemm_args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                        {int(problems), args.shapes, nullptr},  // sizes on the device only
                                        {args.a, args.stride_a, args.b, args.stride_b},
                                        epilogue,
                                        hw};
  typename G::Gemm gemm;
  if (G::Gemm::get_workspace_size(gemm_args) > size_t(workspace_bytes))
    return "CUTLASS workspace exceeds its section";
  if (gemm.can_implement(gemm_args) != cutlass::Status::kSuccess) return "CUTLASS cannot run this problem";
  cutlass::Status st = gemm.initialize(gemm_args, workspace, stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
  return st == cutlass::Status::kSuccess ? std::string() : std::string("CUTLASS: ") + cutlassGetStatusString(st);
}

}  // namespace
}  // namespace pit
