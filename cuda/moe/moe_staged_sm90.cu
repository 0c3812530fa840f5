// Staged Hopper forward of pit_moe_matmul (FFI target pit_moe_matmul_staged): SRead as a gather
// of x's rows into routing order, CUTLASS's Hopper grouped GEMM over the experts' contiguous row
// blocks (TMA for both operands, warp-specialised cooperative 128x256x64 tiles, persistent), and
// SWrite in the GEMM's epilogue: with the output in assignment order, each product row is stored
// straight to its assignment's row (moe_scatter_epilogue.cuh); in routing order, CUTLASS's TMA
// epilogue stores the tile. The gather is skipped where x is already in routing order. The
// problem sizes and pointers (one problem per expert, experts of 16384 rows or more split into
// 4096-row blocks) are written on the device from group_starts, so nothing waits for the host.
//
// Why staged: on compute-bound shapes (Mixtral, about a thousand rows per expert) CUTLASS's
// grouped GEMM runs at 1.03-1.06x the dense cuBLAS time where the fused gather kernel
// (moe_sm90.cuh) stays near 1.3x, and the gather costs a few percent (benchmarks/results/
// 2026-11-27_session19/, _session21/). On weight-bound shapes (Qwen-like, ~128 rows per expert)
// the fused kernel is faster; the lowering chooses (pit_jax/moe_cuda.py: staged_applies).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../common/cutlass_grouped_gemm_sm90.cuh"
#include "../common/device_query.cuh"
#include "../common/ffi_common.h"
#include "../common/poison_outputs.cuh"
#include "moe_scatter_epilogue.cuh"
#include "moe_staged_layout.h"

namespace pit {
namespace {

static_assert(kMoeStagedArgsBytesPerExpert == kGroupedGemmArgsBytesPerProblem, "one args layout per problem");

// Forward: out rows = x rows @ w[e] ([E, d, f], N-major B) or @ w[e]ᵀ (w given as [E, f, d], K-major B).
template <bool kWTransposed>
using ForwardLayoutB = std::conditional_t<kWTransposed, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
template <typename Element, bool kWTransposed>
using ForwardGemm = StagedGemm<Element, cutlass::layout::RowMajor, ForwardLayoutB<kWTransposed>>;
// The same with the product rows scattered to their assignments by the epilogue (64-column chunks:
// 2% slower than the TMA epilogue in routing order, 10% faster than it plus a scatter pass;
// 128-column chunks were slower, benchmarks/results/2026-11-27_session21/scatter_probe_h100/).
template <typename Element, bool kWTransposed>
using ScatterForwardGemm = GroupedGemmWith<Element, cutlass::layout::RowMajor, ForwardLayoutB<kWTransposed>,
                                           ScatterRowsCollectiveEpilogue<Element, 128, 64>>;

// The forward's problems, one thread each (moe_staged_problems: E + slots). An expert of at least
// kMoeStagedSplitMinRows rows is split into blocks of split_rows rows from its first row (the last block
// takes the rest): problem e < E is expert e's first block (or all of it), and problem E + j - 1
// holds the block that starts in rows [j * split_rows, (j + 1) * split_rows) if any (a split
// expert's blocks start split_rows apart and after its first row, so each slot holds at most one;
// the expert is the one holding row j * split_rows). Empty problems get no tiles. split_rows = 0:
// nothing is split.
template <typename G>
__global__ void staged_write_args(StagedArgs<G> args, const int32_t* __restrict__ group_starts, int experts,
                                  int problems, int split_rows, int n, int k,
                                  const typename StagedArgs<G>::Element* rows,
                                  const typename StagedArgs<G>::Element* w, typename StagedArgs<G>::Element* out,
                                  typename G::StrideA sa, typename G::StrideB sb, typename G::StrideD sd) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= problems) return;
  auto split = [&](int e) { return split_rows > 0 && group_starts[e + 1] - group_starts[e] >= kMoeStagedSplitMinRows; };
  int e = 0, start = 0, end = 0;
  if (p < experts) {
    e = p;
    start = group_starts[e];
    end = split(e) ? start + split_rows : group_starts[e + 1];
  } else if (split_rows > 0) {
    const int64_t slot_start = int64_t(p - experts + 1) * split_rows;
    int lo = 0, hi = experts;  // the last expert e with group_starts[e] <= slot_start (group E: invalid ids)
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (group_starts[mid] <= slot_start) lo = mid; else hi = mid - 1;
    }
    if (lo < experts && split(lo) && group_starts[lo] < slot_start) {
      const int64_t s0 = group_starts[lo];
      const int64_t block = s0 + (slot_start - s0 + split_rows - 1) / split_rows * split_rows;
      if (block < slot_start + split_rows && block < group_starts[lo + 1]) {
        e = lo;
        start = int(block);
        end = int(std::min<int64_t>(block + split_rows, group_starts[lo + 1]));
      }
    }
  }
  args.shapes[p] = {end - start, n, k};
  args.a[p] = rows + int64_t(start) * k;
  args.b[p] = w + int64_t(e) * k * n;
  args.d[p] = out + int64_t(start) * n;
  args.stride_a[p] = sa;
  args.stride_b[p] = sb;
  args.stride_d[p] = sd;
  args.row_starts[p] = start;
}

// SRead: sorted[p] = x[order[p] / rows_per_source], one warp per row, 16-byte vectors.
__global__ void staged_gather_rows(const uint4* __restrict__ x, const int32_t* __restrict__ order, uint4* sorted,
                                   int64_t rows, int64_t vecs_per_row, int64_t rows_per_source) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; p < rows; p += warps) {
    const uint4* src = x + (order[p] / rows_per_source) * vecs_per_row;
    uint4* dst = sorted + p * vecs_per_row;
    for (int64_t v = threadIdx.x % 32; v < vecs_per_row; v += 32) dst[v] = src[v];
  }
}

// The rows of invalid ids (routing order from group_starts[E] on, no expert's problem) are zero:
// out[p] with the output in routing order, else out[order[p]].
__global__ void staged_zero_invalid_rows(const int32_t* __restrict__ order, const int32_t* __restrict__ group_starts,
                                         int experts, uint4* out, int64_t rows, int64_t vecs_per_row, bool out_sorted) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t p = group_starts[experts] + (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; p < rows;
       p += warps) {
    uint4* dst = out + (out_sorted ? p : int64_t(order[p])) * vecs_per_row;
    for (int64_t v = threadIdx.x % 32; v < vecs_per_row; v += 32) dst[v] = make_uint4(0, 0, 0, 0);
  }
}

// dW's per-expert arguments: an expert without rows gets no tiles (M = K = 0; CUTLASS would leave
// a K = 0 problem's accumulators unset) and is zeroed by staged_zero_empty_experts.
template <typename G>
__global__ void staged_write_dw_args(StagedArgs<G> args, const int32_t* __restrict__ group_starts, int experts, int d,
                                     int f, const typename StagedArgs<G>::Element* x_rows,
                                     const typename StagedArgs<G>::Element* dy_rows, typename StagedArgs<G>::Element* dw,
                                     typename G::StrideA sa, typename G::StrideB sb, typename G::StrideD sd) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  const int start = group_starts[e], rows = group_starts[e + 1] - start;
  args.shapes[e] = {rows > 0 ? d : 0, f, rows};
  args.a[e] = x_rows + int64_t(start) * d;
  args.b[e] = dy_rows + int64_t(start) * f;
  args.d[e] = dw + int64_t(e) * d * f;
  args.stride_a[e] = sa;
  args.stride_b[e] = sb;
  args.stride_d[e] = sd;
}

// dw[e] = 0 for experts without rows; blockIdx.y is the expert, x-blocks stride over its vectors.
__global__ void staged_zero_empty_experts(const int32_t* __restrict__ group_starts, uint4* dw, int64_t vecs_per_expert) {
  const int e = blockIdx.y;
  if (group_starts[e + 1] != group_starts[e]) return;
  uint4* dst = dw + int64_t(e) * vecs_per_expert;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < vecs_per_expert; v += int64_t(gridDim.x) * blockDim.x)
    dst[v] = make_uint4(0, 0, 0, 0);
}

// SRead into the workspace: rows[p] = src[order[p] / rows_per_source] (routing order).
template <typename Element>
const Element* gather_into(cudaStream_t stream, const void* src, const int32_t* order, uint8_t* dst,
                           int64_t rows, int64_t width, int64_t rows_per_source) {
  staged_gather_rows<<<int(std::min<int64_t>(ceil_div(rows, 8), 65535)), 256, 0, stream>>>(
      static_cast<const uint4*>(src), order, reinterpret_cast<uint4*>(dst), rows, width / 8, rows_per_source);
  return reinterpret_cast<const Element*>(dst);
}

struct StagedCall {
  int64_t experts, assignments, d, f, rows_per_source;
  bool x_sorted, out_sorted;
  const void *x, *w;
  const int32_t *order, *group_starts;
  void* out;
  uint8_t* workspace;
  MoeStagedLayout layout;  // the workspace's sections (checked against its size by the handler)
};

// The forward's grouped GEMM G over rows (x's rows in routing order): per-expert arguments written
// on the device (D pointers into out, in routing order, where G's epilogue uses them), then G with
// the epilogue arguments epilogue_of(args) gives.
// Whether the forward splits large experts into row blocks (PIT_MOE_STAGED_SPLIT=0 turns it off;
// read per call, so a benchmark can compare the two in one process).
bool staged_split_enabled() {
  const char* v = std::getenv("PIT_MOE_STAGED_SPLIT");
  return !(v != nullptr && v[0] == '0' && v[1] == '\0');
}

template <typename G, typename EpilogueOf>
std::string run_forward_gemm(cudaStream_t stream, const StagedCall& c, const typename StagedArgs<G>::Element* rows,
                             EpilogueOf epilogue_of) {
  using Element = typename StagedArgs<G>::Element;
  const int64_t problems = moe_staged_problems(c.experts, c.assignments);
  StagedArgs<G> args(c.workspace + c.layout.args, problems);
  const int n = int(c.f), k = int(c.d);
  staged_write_args<G><<<int(ceil_div(problems, 128)), 128, 0, stream>>>(
      args, c.group_starts, int(c.experts), int(problems), staged_split_enabled() ? int(kMoeStagedSplitRows) : 0, n,
      k, rows, static_cast<const Element*>(c.w), static_cast<Element*>(c.out),
      cutlass::make_cute_packed_stride(typename G::StrideA{}, {1, k, 1}),
      cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1}),
      cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, n, 1}));
  return run_grouped_gemm<G>(stream, args, problems, c.workspace + c.layout.cutlass, kMoeStagedCutlassBytes,
                             epilogue_of(args));
}

template <typename Element, bool kWTransposed>
std::string run_staged(cudaStream_t stream, const StagedCall& c) {
  const Element* rows = c.x_sorted ? static_cast<const Element*>(c.x)
                                   : gather_into<Element>(stream, c.x, c.order, c.workspace + c.layout.x_rows,
                                                          c.assignments, c.d, c.rows_per_source);
  std::string failure;
  if (c.out_sorted) {
    using G = ForwardGemm<Element, kWTransposed>;
    failure = run_forward_gemm<G>(stream, c, rows, [](const StagedArgs<G>& args) { return tma_store_arguments(args); });
  } else {
    using G = ScatterForwardGemm<Element, kWTransposed>;
    failure = run_forward_gemm<G>(stream, c, rows, [&c](const StagedArgs<G>& args) {
      return typename G::EpilogueArguments{static_cast<Element*>(c.out), c.order, args.row_starts, c.f};
    });
  }
  if (!failure.empty()) return failure;
  staged_zero_invalid_rows<<<int(std::min<int64_t>(ceil_div(c.assignments, 8), 1024)), 256, 0, stream>>>(
      c.order, c.group_starts, int(c.experts), static_cast<uint4*>(c.out), c.assignments, c.f / 8, c.out_sorted);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

// The checks both handlers end with: the workspace (workspace_bytes) holds the layout of the call's
// sections (set into c->layout; 16-bit elements; rows_sorted: no out_rows section), and the
// current GPU runs the sm_90a kernels. An empty string where both hold, else what is wrong.
std::string set_layout_and_check_device(StagedCall* c, size_t workspace_bytes, bool rows_sorted) {
  c->layout = moe_staged_layout(c->experts, c->assignments, c->d, c->f, 2, c->x_sorted, rows_sorted);
  if (int64_t(workspace_bytes) < c->layout.total) return "workspace smaller than the layout needs";
  int major = 0;
  current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major);
  if (major != 9)
    return "needs a compute capability 9.0 GPU (sm_90a CUTLASS kernels); the lowering chose this path for one";
  return {};
}

ffi::Error MoeMatmulStagedCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> order,
                               ffi::Buffer<ffi::S32> group_starts, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t rows_per_source,
                               bool w_transposed, bool x_sorted, bool out_sorted) {
  const std::string op = "pit_moe_matmul_staged: ";
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2 || order.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(op + "expected x [R, d], w [E, d, f] (or [E, f, d] transposed), order [A]");
  StagedCall c{};
  c.experts = wd[0];
  c.d = xd[1];
  c.f = w_transposed ? wd[1] : wd[2];
  c.assignments = order.dimensions()[0];
  c.rows_per_source = rows_per_source;
  c.x_sorted = x_sorted;
  c.out_sorted = out_sorted;
  if ((w_transposed ? wd[2] : wd[1]) != c.d || od[0] != c.assignments || od[1] != c.f || rows_per_source <= 0 ||
      xd[0] * rows_per_source != c.assignments || (x_sorted && rows_per_source != 1))
    return ffi::Error::InvalidArgument(op + "shapes of x, w, order and out do not agree");
  if (group_starts.dimensions().size() != 1 || group_starts.dimensions()[0] != c.experts + 2)
    return ffi::Error::InvalidArgument(op + "group_starts must be [E + 2]");
  const auto dtype = x.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) || w.element_type() != dtype ||
      out->element_type() != dtype)
    return ffi::Error::InvalidArgument(op + "x, w and out must all be bfloat16 or all float16");
  if (c.d % 8 || c.f % 8)
    return ffi::Error::InvalidArgument(op + "d and f must be multiples of 8 (16-byte rows for TMA)");
  if (c.assignments * std::max(c.d, c.f) >= (int64_t(1) << 31) || c.f >= (int64_t(1) << 31))
    return ffi::Error::InvalidArgument(op + "too many rows for 32-bit problem sizes");
  // The forward's epilogue writes the product in place (rows_sorted: no out_rows section).
  if (const std::string bad = set_layout_and_check_device(&c, workspace->size_bytes(), true); !bad.empty())
    return ffi::Error::InvalidArgument(op + bad);
  poison_device_outputs(stream, out);
  if (c.assignments == 0 || c.f == 0) return ffi::Error::Success();
  c.x = x.untyped_data();
  c.w = w.untyped_data();
  c.order = order.typed_data();
  c.group_starts = group_starts.typed_data();
  c.out = out->untyped_data();
  c.workspace = workspace->typed_data();
  std::string failure;
  if (dtype == ffi::DataType::BF16)
    failure = w_transposed ? run_staged<cutlass::bfloat16_t, true>(stream, c)
                           : run_staged<cutlass::bfloat16_t, false>(stream, c);
  else
    failure = w_transposed ? run_staged<cutlass::half_t, true>(stream, c) : run_staged<cutlass::half_t, false>(stream, c);
  if (!failure.empty()) return ffi::Error::Internal(op + failure);
  return ffi::Error::Success();
}

// dW: x's and dy's rows gathered into routing order where they are not (the workspace's x_rows
// and out_rows sections, [A, d] and [A, f]), then dw[e] = x_eᵀ dy_e by the grouped GEMM.
template <typename Element>
std::string run_staged_dw(cudaStream_t stream, const StagedCall& c, const void* dy, bool dy_sorted) {
  using G = TnGemm<Element>;
  const MoeStagedLayout& layout = c.layout;
  const Element* x_rows = c.x_sorted ? static_cast<const Element*>(c.x)
                                     : gather_into<Element>(stream, c.x, c.order, c.workspace + layout.x_rows,
                                                            c.assignments, c.d, c.rows_per_source);
  const Element* dy_rows = dy_sorted ? static_cast<const Element*>(dy)
                                     : gather_into<Element>(stream, dy, c.order, c.workspace + layout.out_rows,
                                                            c.assignments, c.f, 1);
  StagedArgs<G> args(c.workspace + layout.args, c.experts);
  const int d = int(c.d), f = int(c.f);
  staged_write_dw_args<G><<<int(ceil_div(c.experts, 128)), 128, 0, stream>>>(
      args, c.group_starts, int(c.experts), d, f, x_rows, dy_rows, static_cast<Element*>(c.out),
      cutlass::make_cute_packed_stride(typename G::StrideA{}, {d, 1, 1}),
      cutlass::make_cute_packed_stride(typename G::StrideB{}, {f, 1, 1}),
      cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, f, 1}));
  staged_zero_empty_experts<<<dim3(unsigned(std::min<int64_t>(ceil_div(c.d * c.f / 8, 256), 1024)),
                                   unsigned(c.experts)), 256, 0, stream>>>(c.group_starts, static_cast<uint4*>(c.out),
                                                                          c.d * c.f / 8);
  const std::string failure =
      run_grouped_gemm<G>(stream, args, c.experts, c.workspace + layout.cutlass, kMoeStagedCutlassBytes,
                          tma_store_arguments(args));
  if (!failure.empty()) return failure;
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

ffi::Error MoeMatmulTnStagedCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                 ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::S32> group_starts,
                                 ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                                 int64_t rows_per_source, bool x_sorted, bool out_sorted) {
  const std::string op = "pit_moe_matmul_tn_staged: ";
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || wd.size() != 3 || order.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(op + "expected x [R, d], dy [A, f], order [A], dw [E, d, f]");
  StagedCall c{};
  c.experts = wd[0];
  c.d = xd[1];
  c.f = yd[1];
  c.assignments = yd[0];
  c.rows_per_source = rows_per_source;
  c.x_sorted = x_sorted;
  if (order.dimensions()[0] != c.assignments || wd[1] != c.d || wd[2] != c.f || rows_per_source <= 0 ||
      xd[0] * rows_per_source != c.assignments || (x_sorted && rows_per_source != 1))
    return ffi::Error::InvalidArgument(op + "shapes of x, dy, order and dw do not agree");
  if (group_starts.dimensions().size() != 1 || group_starts.dimensions()[0] != c.experts + 2)
    return ffi::Error::InvalidArgument(op + "group_starts must be [E + 2]");
  const auto dtype = x.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) || dy.element_type() != dtype ||
      dw->element_type() != dtype)
    return ffi::Error::InvalidArgument(op + "x, dy and dw must all be bfloat16 or all float16");
  if (c.d % 8 || c.f % 8)
    return ffi::Error::InvalidArgument(op + "d and f must be multiples of 8 (16-byte rows for TMA)");
  if (c.assignments * std::max(c.d, c.f) >= (int64_t(1) << 31) || c.d * c.f >= (int64_t(1) << 31))
    return ffi::Error::InvalidArgument(op + "too many rows for 32-bit problem sizes");
  if (c.experts > 65535) return ffi::Error::InvalidArgument(op + "at most 65535 experts");
  // dW: the out_rows section holds dy's rows gathered (absent where dy is sorted)
  if (const std::string bad = set_layout_and_check_device(&c, workspace->size_bytes(), out_sorted); !bad.empty())
    return ffi::Error::InvalidArgument(op + bad);
  poison_device_outputs(stream, dw);
  if (c.experts == 0 || c.d == 0 || c.f == 0) return ffi::Error::Success();
  c.x = x.untyped_data();
  c.order = order.typed_data();
  c.group_starts = group_starts.typed_data();
  c.out = dw->untyped_data();
  c.workspace = workspace->typed_data();
  const std::string failure = dtype == ffi::DataType::BF16
                                  ? run_staged_dw<cutlass::bfloat16_t>(stream, c, dy.untyped_data(), out_sorted)
                                  : run_staged_dw<cutlass::half_t>(stream, c, dy.untyped_data(), out_sorted);
  if (!failure.empty()) return ffi::Error::Internal(op + failure);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pit

// Both staged targets: x, then w (forward) or dy (dW), order, group_starts; the result and the u8
// workspace; rows_per_source, then each target's flags.
#define PIT_MOE_STAGED_BINDING                                              \
  xla::ffi::Ffi::Bind()                                                     \
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()                        \
      .Arg<xla::ffi::AnyBuffer>()                                           \
      .Arg<xla::ffi::AnyBuffer>()                                           \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()                               \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()                               \
      .Ret<xla::ffi::AnyBuffer>()                                           \
      .Ret<xla::ffi::Buffer<xla::ffi::U8>>()                                \
      .Attr<int64_t>("rows_per_source")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitMoeMatmulTnStagedCuda, pit::MoeMatmulTnStagedCuda,
                              PIT_MOE_STAGED_BINDING.Attr<bool>("x_sorted").Attr<bool>("out_sorted"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitMoeMatmulStagedCuda, pit::MoeMatmulStagedCuda,
                              PIT_MOE_STAGED_BINDING.Attr<bool>("w_transposed")
                                  .Attr<bool>("x_sorted")
                                  .Attr<bool>("out_sorted"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
