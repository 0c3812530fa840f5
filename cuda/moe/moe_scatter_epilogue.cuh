// SWrite inside CUTLASS's Hopper grouped GEMM: an epilogue that writes row m of problem l's product
// straight to its assignment's row of the output, out[order[row_starts[l] + m]], so
// the staged forward needs no separate scatter pass over the [A, f] product (about 500 / d of the
// GEMM's time on an H100: 12% at d = 4096).
//
// It follows the interface of CUTLASS's register-direct ("no smem") ptr-array epilogue and is wrapped
// in CUTLASS's Sm90TmaWarpSpecializedAdapter, so the warp-specialised cooperative ptr-array kernel
// runs it unchanged. Stores straight from the accumulator registers (two columns of 8 rows per warp
// instruction) measured 22% slower than the TMA epilogue plus a separate scatter pass
// (benchmarks/cutlass_probe/scatter_probe.cu), so the tile goes through shared memory in column
// chunks: the consumer threads write their accumulators into a padded [tile rows, chunk] buffer,
// then each thread stores whole 16-byte pieces of rows, a row's chunk being contiguous in the output.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/arch/barrier.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/numeric_conversion.h"

namespace pit {

template <typename Element, int kTileM = 128, int kChunkCols = 64>
class ScatterRowsEpilogue {
  static_assert(kChunkCols % 8 == 0, "chunks of whole 16-byte vectors");
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementOutput = Element;
  using ElementC = void;  // no source operand
  using ElementD = Element;
  // The kernel reads these types only; the output's rows are addressed through Arguments.
  using InternalStrideC = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
  using InternalStrideD = InternalStrideC;
  using StrideC = InternalStrideC*;
  using StrideD = InternalStrideD*;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  // Named by CUTLASS's device adapter only (the conversion to Element is done below).
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;

  // The staging buffer: kTileM rows of kChunkCols columns, padded by 8 columns so that the
  // accumulator writes (8 rows x 4 threads x 2 columns per warp) fall in distinct banks.
  static constexpr int kPitch = kChunkCols + 8;
  struct SharedStorage {
    alignas(16) Element staging[kTileM * kPitch];
  };
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    Element* out = nullptr;                   // [A, n]: one row per assignment
    const int32_t* order = nullptr;           // order[p]: the output row of routing-order row p
    const int32_t* row_starts = nullptr;      // problem l's rows start at routing-order row row_starts[l]
    int64_t out_ld = 0;                       // elements between output rows (n)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.out != nullptr && args.order != nullptr && args.row_starts != nullptr && args.out_ld % 8 == 0;
  }

  CUTLASS_HOST_DEVICE explicit ScatterRowsEpilogue(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char* smem) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    constexpr int kTileN = size<1>(BlockShapeMNK{});
    constexpr int kThreads = size(TiledMma{});  // the consumer warpgroups' threads, all in the epilogue
    static_assert(size<0>(BlockShapeMNK{}) == kTileM && kTileN % kChunkCols == 0, "tile and chunk do not fit");
    constexpr int kVecsPerRow = kChunkCols / 8;
    static_assert(kThreads % kVecsPerRow == 0 && kTileM % (kThreads / kVecsPerRow) == 0, "store passes");
    constexpr int kRowsPerPass = kThreads / kVecsPerRow;
    constexpr int kPasses = kTileM / kRowsPerPass;

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    (void)k_coord;
    const int tile_rows = min(kTileM, int(get<0>(problem_shape_mnkl)) - int(m_coord) * kTileM);
    const int tile_cols = min(kTileN, int(get<1>(problem_shape_mnkl)) - int(n_coord) * kTileN);
    // This thread's accumulator coordinates (row, column) within the tile.
    Tensor coords = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(blk_shape_mnk)));
    CUTE_STATIC_ASSERT_V(size(coords) == size(accumulators), "one coordinate per accumulator");

    // The output rows this thread stores: tile rows thread_idx / kVecsPerRow + pass * kRowsPerPass.
    const int32_t* row_to = params_.order + params_.row_starts[l_coord] + int(m_coord) * kTileM;
    const int vec = thread_idx % kVecsPerRow;
    Element* dst_row[kPasses];
    CUTLASS_PRAGMA_UNROLL
    for (int pass = 0; pass < kPasses; ++pass) {
      const int r = thread_idx / kVecsPerRow + pass * kRowsPerPass;
      dst_row[pass] = r < tile_rows
                          ? params_.out + int64_t(__ldg(row_to + r)) * params_.out_ld + int(n_coord) * kTileN + vec * 8
                          : nullptr;
    }

    Element* staging = reinterpret_cast<SharedStorage*>(smem)->staging;
    cutlass::NumericArrayConverter<Element, float, 2> convert;
    CUTLASS_PRAGMA_UNROLL
    for (int chunk = 0; chunk < kTileN / kChunkCols; ++chunk) {
      if (chunk * kChunkCols >= tile_cols) break;  // the same for every thread
      // The previous chunk's (or tile's) reads of the buffer are done.
      cutlass::arch::NamedBarrier::sync(kThreads, cutlass::arch::ReservedNamedBarriers::EpilogueBarrier);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accumulators); i += 2) {
        const int r = get<0>(coords(i)), c = get<1>(coords(i)) - chunk * kChunkCols;
        const bool pair = get<0>(coords(i + 1)) == r && get<1>(coords(i + 1)) - chunk * kChunkCols == c + 1 &&
                          c % 2 == 0;
        if (pair && c >= 0 && c + 1 < kChunkCols) {
          cutlass::Array<float, 2> acc2;
          acc2[0] = accumulators(i);
          acc2[1] = accumulators(i + 1);
          *reinterpret_cast<cutlass::Array<Element, 2>*>(staging + r * kPitch + c) = convert(acc2);
        } else if (!pair) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < 2; ++j) {
            const int rj = get<0>(coords(i + j)), cj = get<1>(coords(i + j)) - chunk * kChunkCols;
            if (cj >= 0 && cj < kChunkCols) staging[rj * kPitch + cj] = Element(accumulators(i + j));
          }
        }
      }
      cutlass::arch::NamedBarrier::sync(kThreads, cutlass::arch::ReservedNamedBarriers::EpilogueBarrier);
      const int col = chunk * kChunkCols + vec * 8;  // tile_cols is a multiple of 8 (16-byte rows)
      CUTLASS_PRAGMA_UNROLL
      for (int pass = 0; pass < kPasses; ++pass) {
        const int r = thread_idx / kVecsPerRow + pass * kRowsPerPass;
        if (dst_row[pass] != nullptr && col < tile_cols)
          *reinterpret_cast<uint4*>(dst_row[pass] + chunk * kChunkCols) =
              *reinterpret_cast<const uint4*>(staging + r * kPitch + vec * 8);
      }
    }
  }

 private:
  Params params_;
};

// The collective the grouped GEMM's kernel takes: CUTLASS's adapter for register-direct epilogues,
// except that it holds no tensor-map storage (the adapter would reserve the staging buffer's size
// a second time for TMA descriptors this epilogue never uses).
template <typename Element, int kTileM = 128, int kChunkCols = 64>
class ScatterRowsCollectiveEpilogue : public cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
                                          ScatterRowsEpilogue<Element, kTileM, kChunkCols>> {
  using Base = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      ScatterRowsEpilogue<Element, kTileM, kChunkCols>>;

 public:
  using Params = typename ScatterRowsEpilogue<Element, kTileM, kChunkCols>::Params;
  using Base::Base;
  struct TensorMapStorage {};

  CUTLASS_DEVICE auto load_init(Params const&, TensorMapStorage&, int32_t, int32_t) { return cute::make_tuple(nullptr); }
  CUTLASS_DEVICE auto store_init(Params const&, TensorMapStorage&, int32_t, int32_t, int32_t) {
    return cute::make_tuple(nullptr);
  }
  template <bool IsLoad, class ProblemShapeMNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage&, Params const&, cute::TmaDescriptor const*,
                                                ProblemShapeMNKL, int32_t, int32_t) {}
  template <bool IsLoad>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage&, cute::TmaDescriptor const*, int32_t) {}
};

}  // namespace pit
