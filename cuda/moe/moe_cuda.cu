// MoE m-gather/scatter grouped GEMM on CUDA (PIT SRead of token rows, SWrite of output rows).
//
//   out[a] = x[a / r] @ w[e(a)]   (or @ w[e(a)]ᵀ with w given as [E, f, d]: the dx pass)
//
// for every assignment a (r = rows per source row); x's and out's rows may instead be in
// routing order (x_sorted / out_sorted: row p holds assignment order[p]). Routing is done before the call (on
// device, moe_route_cuda.cu): `order` lists assignments grouped by expert (invalid ids last, as
// pseudo-group E), `group_starts` [E+2] their offsets and `tile_starts` [E+2] the prefix sum of
// each group's 128-row routing tiles. A CTA finds its group by binary search in `tile_starts`,
// gathers its x rows straight from the unpermuted x (cp.async), streams w[e] and scatters rows
// of out. Tiles of the invalid pseudo-group write zero rows; CTAs past the last tile exit.
// Two forward kernels: on Hopper with bf16/fp16 and 16-byte rows, the wgmma kernel of
// moe_sm90.cuh; otherwise (fp32, odd d or f, other GPUs) the mma.sync kernel below,
// one CTA per half (64 rows) of a routing tile x 128 columns.
//
//   dw[e] = Σ_{a in group e} x[a / r]ᵀ dy[a]
//
// On Hopper (bf16/fp16, 16-byte rows) the wgmma dW kernel of moe_sm90.cuh (128 x 256 tiles,
// 64 gathered rows per stage); otherwise one CTA per (expert, 128 x 128 tile of dw) walks its
// group's rows 32 at a time with mma.sync (tile math shared with the k-gather dW). Both gather
// rows of x and dy by `order`; empty experts write zeros.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/dtype_dispatch.cuh"
#include "../common/ffi_common.h"
#include "../common/mma_sm80.cuh"
#include "../common/poison_outputs.cuh"
#include "../common/tile_copy.cuh"
#include "../common/tn_tile_math.cuh"
#include "moe_sm90.cuh"
#include "moe_sm90_persistent.cuh"
#include "moe_tiles.cuh"

namespace pit {
namespace {

constexpr int kMoeThreads = 128;  // 4 warps: 2 (rows) x 2 (columns), 32 x 64 each

template <typename T, bool kWTransposed>
struct MoeConfig {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kBM = 64, kBN = 128, kBK = 32;
  static constexpr int kHalves = kMoeRouteTileRows / kBM;  // CTAs per routing tile
  static constexpr int kStages = kTensorCores ? 4 : 2;
  static constexpr int kVec = 16 / int(sizeof(T));
  static constexpr int kAStride = kBK + kVec;
  // B tile: [kBK][kBN] rows of w[e] ([d, f]), or [kBN][kBK] rows of w[e]ᵀ's source ([f, d])
  static constexpr int kBStride = kWTransposed ? kBK + kVec : kBN + kVec;
  static constexpr int kBElems = kWTransposed ? kBN * kBStride : kBK * kBStride;
  static constexpr int kStageElems = kBM * kAStride + kBElems;
  static constexpr int kSmemBytes = kStages * kStageElems * int(sizeof(T)) + 2 * kBM * 4;
};
static_assert(kMoeRouteTileRows % MoeConfig<float, false>::kBM == 0, "routing tile = whole halves");

template <typename T, bool kWTransposed>
struct MoeTensorCoreMath {
  using C = MoeConfig<T, kWTransposed>;
  float acc[2][8][4] = {};

  __device__ __forceinline__ void step(const T* as, const T* bs, int warp, int lane) {
    const int wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int ks = 0; ks < C::kBK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[mi], as + (wm * 32 + mi * 16 + lane % 16) * C::kAStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        uint32_t bq[4];  // k-pairs of columns 16nj..+7 (bq[0..1]) and +8..+15 (bq[2..3])
        if constexpr (kWTransposed)
          ldmatrix_x4(bq, bs + (wn * 64 + nj * 16 + (lane / 16) * 8 + lane % 8) * C::kBStride + ks * 16 +
                              ((lane / 8) % 2) * 8);
        else
          ldmatrix_x4_trans(bq, bs + (ks * 16 + lane % 8 + ((lane / 8) % 2) * 8) * C::kBStride + wn * 64 +
                                    nj * 16 + (lane / 16) * 8);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][2 * nj], a[mi], bq[0], bq[1]);
          mma_16816<T>(acc[mi][2 * nj + 1], a[mi], bq[2], bq[3]);
        }
      }
    }
  }

  // SWrite: tile row r goes to out row dst_rows[r] (rows >= rows_valid are not written).
  __device__ __forceinline__ void store(T* out, int64_t ld, const int32_t* dst_rows, int rows_valid, int64_t cols,
                                       int warp, int lane) const {
    const int wm = warp / 2, wn = warp % 2, gq = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * 32 + mi * 16 + gq + half * 8;
        if (r >= rows_valid) continue;
        T* row = out + int64_t(dst_rows[r]) * ld;
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const int c = wn * 64 + ni * 8 + 2 * tq;
          if (c < cols) row[c] = from_float<T>(acc[mi][ni][2 * half]);
          if (c + 1 < cols) row[c + 1] = from_float<T>(acc[mi][ni][2 * half + 1]);
        }
      }
  }
};

template <typename T, bool kWTransposed>
struct MoeCudaCoreMath {  // fp32: each thread 8 rows x 8 columns
  using C = MoeConfig<T, kWTransposed>;
  float acc[8][8] = {};

  __device__ __forceinline__ void step(const T* as, const T* bs, int, int) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < C::kBK; ++kk) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = float(as[(tr * 8 + i) * C::kAStride + kk]);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        b[j] = float(kWTransposed ? bs[(tc * 8 + j) * C::kBStride + kk] : bs[kk * C::kBStride + tc * 8 + j]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(T* out, int64_t ld, const int32_t* dst_rows, int rows_valid, int64_t cols,
                                       int, int) const {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (tr * 8 + i >= rows_valid) continue;
      T* row = out + int64_t(dst_rows[tr * 8 + i]) * ld;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (tc * 8 + j < cols) row[tc * 8 + j] = from_float<T>(acc[i][j]);
    }
  }
};

template <typename T, bool kWTransposed>
using MoeMath = std::conditional_t<MoeConfig<T, kWTransposed>::kTensorCores, MoeTensorCoreMath<T, kWTransposed>,
                                   MoeCudaCoreMath<T, kWTransposed>>;

template <typename T, bool kWTransposed, bool kVecX, bool kVecW>
__global__ void __launch_bounds__(kMoeThreads) pit_moe_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                      const int32_t* __restrict__ order,
                                                                      const int32_t* __restrict__ group_starts,
                                                                      const int32_t* __restrict__ tile_starts,
                                                                      T* __restrict__ out, MoeShape s) {
  using C = MoeConfig<T, kWTransposed>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  int32_t* dst_rows = reinterpret_cast<int32_t*>(smem_bytes + C::kStages * C::kStageElems * sizeof(T));
  int32_t* src_rows = dst_rows + C::kBM;  // row of x of each tile row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t slot = blockIdx.x % (s.max_row_tiles * C::kHalves);  // row tiles fastest: experts side by side
  const int64_t n0 = (blockIdx.x / (s.max_row_tiles * C::kHalves)) * C::kBN;
  MoeRouteTile tile;
  if (!find_route_tile(tile_starts, group_starts, s.experts, slot / C::kHalves, &tile)) return;
  const int64_t p0 = tile.first + (slot % C::kHalves) * C::kBM;
  const int rows_valid = min(tile.rows - int(slot % C::kHalves) * C::kBM, C::kBM);
  if (rows_valid <= 0) return;  // the routing tile's second half is empty
  const int group = tile.group;
  for (int r = threadIdx.x; r < C::kBM; r += kMoeThreads) {
    const int32_t a = r < rows_valid ? order[p0 + r] : 0, p = r < rows_valid ? int32_t(p0 + r) : 0;
    dst_rows[r] = s.out_sorted ? p : a;
    src_rows[r] = s.x_sorted ? p : int32_t(a / s.rows_per_source);
  }
  __syncthreads();
  const int64_t cols = min(int64_t(C::kBN), s.f - n0);

  if (group == s.experts) {  // assignments with an invalid expert id: zero rows
    for (int i = threadIdx.x; i < rows_valid * C::kBN; i += kMoeThreads) {
      const int r = i / C::kBN, c = i % C::kBN;
      if (c < cols) out[int64_t(dst_rows[r]) * s.f + n0 + c] = zero_value<T>();
    }
    return;
  }

  const T* w_e = w + int64_t(group) * s.d * s.f;
  auto load_stage = [&](int chunk, int stage) {
    T* as = smem + stage * C::kStageElems;
    T* bs = as + C::kBM * C::kAStride;
    const int64_t k0 = int64_t(chunk) * C::kBK;
    constexpr int kAVecsPerRow = C::kBK / C::kVec;
    for (int i = threadIdx.x; i < C::kBM * kAVecsPerRow; i += kMoeThreads) {  // SRead: token rows of x
      const int r = i / kAVecsPerRow, c = (i % kAVecsPerRow) * C::kVec;
      const int64_t src = src_rows[r], k = k0 + c;
      const int64_t valid = r >= rows_valid ? 0 : (s.d - k < C::kVec ? s.d - k : C::kVec);
      load_segment<T, kVecX>(as + r * C::kAStride + c, x + src * s.d + k, valid, x);
    }
    if constexpr (kWTransposed)  // w[e] is [f, d]: kBN rows of n, kBK elements of k each
      load_tile<T, kVecW, C::kBN, C::kBK, kMoeThreads>(bs, C::kBStride, w_e + n0 * s.d + k0, s.d, s.f - n0,
                                                       s.d - k0, w);
    else  // w[e] is [d, f]: kBK rows of k, kBN elements of n each
      load_tile<T, kVecW, C::kBK, C::kBN, kMoeThreads>(bs, C::kBStride, w_e + k0 * s.f + n0, s.f, s.d - k0,
                                                       s.f - n0, w);
  };

  MoeMath<T, kWTransposed> math;
  pipelined_mainloop<C::kStages>(int(ceil_div(s.d, C::kBK)), load_stage, [&](int, int stage) {
    const T* as = smem + stage * C::kStageElems;
    math.step(as, as + C::kBM * C::kAStride, warp, lane);
  });
  math.store(out + n0, s.f, dst_rows, rows_valid, cols, warp, lane);  // SWrite
}

template <typename T, bool kWTransposed>
cudaError_t launch_moe_forward_sm80(cudaStream_t stream, const MoeShape& s, const void* x, const void* w,
                                    const int32_t* order, const int32_t* group_starts, const int32_t* tile_starts,
                                    void* out) {
  using C = MoeConfig<T, kWTransposed>;
  const bool vec_x = rows_copy_by_16_bytes<T>(x, s.d), vec_w = rows_copy_by_16_bytes<T>(w, kWTransposed ? s.d : s.f);
  auto kernel = vec_x ? (vec_w ? pit_moe_forward_kernel<T, kWTransposed, true, true>
                               : pit_moe_forward_kernel<T, kWTransposed, true, false>)
                      : (vec_w ? pit_moe_forward_kernel<T, kWTransposed, false, true>
                               : pit_moe_forward_kernel<T, kWTransposed, false, false>);
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid = unsigned(s.max_row_tiles * C::kHalves * ceil_div(s.f, C::kBN));
  kernel<<<grid, kMoeThreads, C::kSmemBytes, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w), order,
                                                        group_starts, tile_starts, static_cast<T*>(out), s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_moe_forward(cudaStream_t stream, const MoeShape& s, const void* x, const void* w,
                               const int32_t* order, const int32_t* group_starts, const int32_t* tile_starts,
                               void* out) {
  if (s.assignments == 0 || s.f == 0) return cudaSuccess;
  if constexpr (sizeof(T) == 2) {
    if (moe_sm90_applies<T>(s, x, w, out))
      return moe_persistent_requested()
                 ? launch_moe_forward_persistent_sm90<T>(stream, s, x, w, order, group_starts, tile_starts, out)
                 : launch_moe_forward_sm90<T>(stream, s, x, w, order, group_starts, tile_starts, out);
  }
  return s.w_transposed ? launch_moe_forward_sm80<T, true>(stream, s, x, w, order, group_starts, tile_starts, out)
                        : launch_moe_forward_sm80<T, false>(stream, s, x, w, order, group_starts, tile_starts, out);
}

// The checks both forward handlers (`name`) share: x [R, d], w [E, d, f] (w_d: its d extent),
// order [A], out [A, f] for the shape s, one x row per assignment when x is in routing order,
// the [E + 2] tables, the kernels' routing tile and one dtype for x, w and out.
ffi::Error check_forward_operands(const char* name, const MoeShape& s, ffi::AnyBuffer x, ffi::AnyBuffer w,
                                  int64_t w_d, ffi::Buffer<ffi::S32> group_starts, ffi::Buffer<ffi::S32> tile_starts,
                                  ffi::Result<ffi::AnyBuffer>& out, int64_t tile_rows) {
  const std::string prefix = std::string(name) + ": ";
  const auto od = out->dimensions();
  if (tile_rows != kMoeRouteTileRows)
    return ffi::Error::InvalidArgument(prefix + "tile_rows does not match the kernels' routing tile");
  if (w_d != s.d || od[0] != s.assignments || od[1] != s.f || s.rows_per_source <= 0 ||
      s.sources * s.rows_per_source != s.assignments)
    return ffi::Error::InvalidArgument(prefix + "shapes of x, w, order and out do not agree");
  if (s.x_sorted && s.rows_per_source != 1)
    return ffi::Error::InvalidArgument(prefix + "x in routing order needs one row per assignment");
  if (group_starts.dimensions().size() != 1 || group_starts.dimensions()[0] != s.experts + 2 ||
      tile_starts.dimensions().size() != 1 || tile_starts.dimensions()[0] != s.experts + 2)
    return ffi::Error::InvalidArgument(prefix + "group_starts and tile_starts must be [E + 2]");
  if (w.element_type() != x.element_type() || out->element_type() != x.element_type())
    return ffi::Error::InvalidArgument(prefix + "x, w and out must share one dtype");
  return ffi::Error::Success();
}

ffi::Error MoeMatmulCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> order,
                         ffi::Buffer<ffi::S32> group_starts, ffi::Buffer<ffi::S32> tile_starts,
                         ffi::Result<ffi::AnyBuffer> out, int64_t rows_per_source, int64_t tile_rows,
                         bool w_transposed, bool x_sorted, bool out_sorted) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || order.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "pit_moe_matmul: expected x [R, d], w [E, d, f] (or [E, f, d] transposed), order [A], out [A, f]");
  const MoeShape s = make_moe_shape(xd[0], xd[1], w_transposed ? wd[1] : wd[2], wd[0], order.dimensions()[0],
                                    rows_per_source, w_transposed, x_sorted, out_sorted);
  ffi::Error bad = check_forward_operands("pit_moe_matmul", s, x, w, w_transposed ? wd[2] : wd[1],
                                                group_starts, tile_starts, out, tile_rows);
  if (bad.failure()) return bad;
  if (s.max_row_tiles * MoeConfig<float, false>::kHalves * ceil_div(s.f, MoeConfig<float, false>::kBN) >=
      (int64_t(1) << 31))
    return ffi::Error::InvalidArgument("pit_moe_matmul: too many tiles for one launch");
  poison_device_outputs(stream, out);
  bool known;
  const cudaError_t err = dispatch_dtype(x.element_type(), [&](auto tag) {
    return launch_moe_forward<decltype(tag)>(stream, s, x.untyped_data(), w.untyped_data(), order.typed_data(),
                                             group_starts.typed_data(), tile_starts.typed_data(), out->untyped_data());
  }, &known);
  return dispatch_outcome("pit_moe_matmul", known, err);
}

// Forward with a fused epilogue (moe_tiles.cuh's MoeEpilogue): ReLU or GELU of the product,
// the per-assignment combine weight (scale [A], fp32) or SwiGLU with w_up (otherwise w_up and
// scale are unused placeholders). The Hopper kernel only: the Python lowering emits this call
// only where that kernel serves and lowers the unfused matmuls elsewhere, so anything else is
// a clear error.
ffi::Error MoeFusedCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer w_up,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::S32> group_starts,
                        ffi::Buffer<ffi::S32> tile_starts, ffi::Result<ffi::AnyBuffer> out, int64_t rows_per_source,
                        int64_t tile_rows, int64_t epilogue, bool x_sorted, bool out_sorted) {
  const auto xd = x.dimensions(), wd = w.dimensions(), ud = w_up.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || order.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("pit_moe_fused: expected x [R, d], w [E, d, f], order [A], out [A, f]");
  if (epilogue < kEpiReLU || epilogue > kEpiScale)
    return ffi::Error::InvalidArgument("pit_moe_fused: unknown epilogue");
  const MoeShape s = make_moe_shape(xd[0], xd[1], wd[2], wd[0], order.dimensions()[0], rows_per_source, false,
                                    x_sorted, out_sorted);
  ffi::Error bad = check_forward_operands("pit_moe_fused", s, x, w, wd[1], group_starts, tile_starts, out, tile_rows);
  if (bad.failure()) return bad;
  const bool swiglu = epilogue == kEpiSwiGLU;
  if (swiglu && (ud.size() != 3 || ud[0] != wd[0] || ud[1] != wd[1] || ud[2] != wd[2]))
    return ffi::Error::InvalidArgument("pit_moe_fused: w_up must have w's shape [E, d, f]");
  if (swiglu && w_up.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("pit_moe_fused: w_up must have x's dtype");
  if (epilogue == kEpiScale && (scale.dimensions().size() != 1 || scale.dimensions()[0] != s.assignments))
    return ffi::Error::InvalidArgument("pit_moe_fused: scale must be [A], one factor per assignment");
  if (s.max_row_tiles * ceil_div(s.f, int64_t(swiglu ? MoeSm90Config::kBN / 2 : MoeSm90Config::kBN)) >=
      (int64_t(1) << 31))
    return ffi::Error::InvalidArgument("pit_moe_fused: too many tiles for one launch");
  if (s.assignments == 0 || s.f == 0) return ffi::Error::Success();
  poison_device_outputs(stream, out);
  cudaError_t err = cudaErrorNotSupported;
  bool served = false;
  if (x.element_type() == ffi::DataType::BF16 || x.element_type() == ffi::DataType::F16) {
    bool known;
    err = dispatch_dtype(x.element_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (sizeof(T) == 2) {
        if (moe_sm90_applies<T>(s, x.untyped_data(), w.untyped_data(), out->untyped_data()) &&
            (!swiglu || reinterpret_cast<uintptr_t>(w_up.untyped_data()) % 16 == 0)) {
          served = true;
          auto launch = moe_persistent_requested() ? launch_moe_forward_persistent_sm90<T> : launch_moe_forward_sm90<T>;
          return launch(stream, s, x.untyped_data(), w.untyped_data(), order.typed_data(),
                                            group_starts.typed_data(), tile_starts.typed_data(), out->untyped_data(),
                                            int(epilogue), swiglu ? w_up.untyped_data() : nullptr,
                                            epilogue == kEpiScale ? scale.typed_data() : nullptr);
        }
      }
      return cudaErrorNotSupported;
    }, &known);
  }
  if (!served)
    return ffi::Error::InvalidArgument(
        "pit_moe_fused: the fused-epilogue kernel needs bf16/fp16, d and f multiples of 8, 16-byte aligned "
        "operands and a compute capability 9.0 GPU (PIT_DISABLE_WGMMA unset); use the unfused matmuls");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("pit_moe_fused: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// ---- dW: per expert, xᵀ dy over its gathered rows ---------------------------------------------

template <typename T, bool kVecX, bool kVecDy>
__global__ void __launch_bounds__(TnConfig<T>::kThreads) pit_moe_tn_kernel(const T* __restrict__ x,
                                                                           const T* __restrict__ dy,
                                                                           const int32_t* __restrict__ order,
                                                                           const int32_t* __restrict__ group_starts,
                                                                           T* __restrict__ dw, MoeShape s,
                                                                           int64_t d_tiles, int64_t f_tiles) {
  using C = TnConfig<T>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t f_tile = blockIdx.x % f_tiles, d_tile = (blockIdx.x / f_tiles) % d_tiles;
  const int64_t expert = blockIdx.x / (f_tiles * d_tiles);
  const int64_t d0 = d_tile * C::kBM, f0 = f_tile * C::kBN;
  const int64_t first = group_starts[expert], end = group_starts[expert + 1];
  const int n_chunks = int(ceil_div(end - first, C::kBR));

  auto load_stage = [&](int chunk, int stage) {
    T* xs = smem + stage * C::kStageElems;
    T* ds = xs + C::kBR * C::kXStride;
    const int64_t p0 = first + int64_t(chunk) * C::kBR;
    constexpr int kXVecsPerRow = C::kBM / C::kVec, kDVecsPerRow = C::kBN / C::kVec;
    for (int i = threadIdx.x; i < C::kBR * kXVecsPerRow; i += C::kThreads) {
      const int r = i / kXVecsPerRow, c = (i % kXVecsPerRow) * C::kVec;
      const bool live = p0 + r < end;
      const int64_t src = !live ? 0 : (s.x_sorted ? p0 + r : order[p0 + r] / s.rows_per_source), col = d0 + c;
      const int64_t valid = !live ? 0 : (s.d - col < C::kVec ? s.d - col : C::kVec);
      load_segment<T, kVecX>(xs + r * C::kXStride + c, x + src * s.d + col, valid, x);
    }
    for (int i = threadIdx.x; i < C::kBR * kDVecsPerRow; i += C::kThreads) {
      const int r = i / kDVecsPerRow, c = (i % kDVecsPerRow) * C::kVec;
      const bool live = p0 + r < end;
      const int64_t a = !live ? 0 : (s.out_sorted ? p0 + r : order[p0 + r]), col = f0 + c;
      const int64_t valid = !live ? 0 : (s.f - col < C::kVec ? s.f - col : C::kVec);
      load_segment<T, kVecDy>(ds + r * C::kDStride + c, dy + a * s.f + col, valid, dy);
    }
  };

  TnMath<T> math;
  const uint64_t all_columns[C::kWords] = {~0ull, ~0ull};
  pipelined_mainloop<C::kStages>(n_chunks, load_stage, [&](int, int stage) {
    const T* xs = smem + stage * C::kStageElems;
    math.step(xs, xs + C::kBR * C::kXStride, all_columns, warp, lane);
  });
  math.store(dw + (expert * s.d + d0) * s.f + f0, s.f, s.d - d0, s.f - f0, warp, lane);
}

template <typename T>
cudaError_t launch_moe_tn(cudaStream_t stream, const MoeShape& s, const void* x, const void* dy,
                          const int32_t* order, const int32_t* group_starts, void* dw) {
  using C = TnConfig<T>;
  if (s.experts == 0 || s.d == 0 || s.f == 0) return cudaSuccess;
  if constexpr (sizeof(T) == 2) {
    if (moe_sm90_applies<T>(s, x, dy, dw)) return launch_moe_tn_sm90<T>(stream, s, x, dy, order, group_starts, dw);
  }
  const bool vec_x = rows_copy_by_16_bytes<T>(x, s.d), vec_dy = rows_copy_by_16_bytes<T>(dy, s.f);
  auto kernel = vec_x ? (vec_dy ? pit_moe_tn_kernel<T, true, true> : pit_moe_tn_kernel<T, true, false>)
                      : (vec_dy ? pit_moe_tn_kernel<T, false, true> : pit_moe_tn_kernel<T, false, false>);
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t d_tiles = ceil_div(s.d, C::kBM), f_tiles = ceil_div(s.f, C::kBN);
  kernel<<<unsigned(s.experts * d_tiles * f_tiles), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), order, group_starts, static_cast<T*>(dw), s, d_tiles,
      f_tiles);
  return cudaGetLastError();
}

ffi::Error MoeMatmulTnCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::S32> order,
                           ffi::Buffer<ffi::S32> group_starts, ffi::Result<ffi::AnyBuffer> dw,
                           int64_t rows_per_source, bool x_sorted, bool out_sorted) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || wd.size() != 3 || order.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("pit_moe_matmul_tn: expected x [R, d], dy [A, f], order [A], dw [E, d, f]");
  const MoeShape s = make_moe_shape(xd[0], xd[1], yd[1], wd[0], yd[0], rows_per_source, false, x_sorted, out_sorted);
  if (order.dimensions()[0] != s.assignments || wd[1] != s.d || wd[2] != s.f || rows_per_source <= 0 ||
      s.sources * rows_per_source != s.assignments)
    return ffi::Error::InvalidArgument("pit_moe_matmul_tn: shapes of x, dy, order and dw do not agree");
  if (x_sorted && rows_per_source != 1)
    return ffi::Error::InvalidArgument("pit_moe_matmul_tn: x in routing order needs one row per assignment");
  if (group_starts.dimensions().size() != 1 || group_starts.dimensions()[0] != s.experts + 2)
    return ffi::Error::InvalidArgument("pit_moe_matmul_tn: group_starts must be [E + 2]");
  if (dy.element_type() != x.element_type() || dw->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("pit_moe_matmul_tn: x, dy and dw must share one dtype");
  if (s.experts * ceil_div(s.d, 128) * ceil_div(s.f, 128) >= (int64_t(1) << 31))
    return ffi::Error::InvalidArgument("pit_moe_matmul_tn: too many tiles for one launch");
  poison_device_outputs(stream, dw);
  bool known;
  const cudaError_t err = dispatch_dtype(x.element_type(), [&](auto tag) {
    return launch_moe_tn<decltype(tag)>(stream, s, x.untyped_data(), dy.untyped_data(), order.typed_data(),
                                        group_starts.typed_data(), dw->untyped_data());
  }, &known);
  return dispatch_outcome("pit_moe_matmul_tn", known, err);
}

}  // namespace
}  // namespace pit

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitMoeMatmulCuda, pit::MoeMatmulCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows_per_source")
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<bool>("w_transposed")
                                  .Attr<bool>("x_sorted")
                                  .Attr<bool>("out_sorted"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitMoeFusedCuda, pit::MoeFusedCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows_per_source")
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("epilogue")
                                  .Attr<bool>("x_sorted")
                                  .Attr<bool>("out_sorted"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitMoeMatmulTnCuda, pit::MoeMatmulTnCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows_per_source")
                                  .Attr<bool>("x_sorted")
                                  .Attr<bool>("out_sorted"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
