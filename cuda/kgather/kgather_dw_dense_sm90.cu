// k-gather's dense dW, gated on the device (FFI target pit_dense_tn_gated; PIT_KGATHER_DW=device).
//
// dw = Σ_batch xᵀ dy by CUTLASS's Hopper grouped GEMM with one problem (M = K, N = N, reduction =
// the batch's rows), unless the dW products path (kgather_dw_products.cuh) already wrote dw: the
// products call runs first, and its index total (offsets[groups] in its scratch) against its cap
// decides. A kernel writes the problem's size from that total, so a skipped GEMM gets no tiles and
// nothing waits for the host; no lax.cond. dw arrives as an operand aliased to the result and is
// either left as the products path wrote it or overwritten whole.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/cutlass_grouped_gemm_sm90.cuh"
#include "../common/device_query.cuh"
#include "../common/ffi_common.h"

namespace pit {
namespace {

// Workspace: the one problem's arguments, then CUTLASS's own section.
constexpr int64_t kGatedCutlassOffset = kGroupedGemmArgsBytesPerProblem;
constexpr int64_t kGatedCutlassBytes = int64_t(1) << 20;
constexpr int64_t kGatedWorkspaceBytes = kGatedCutlassOffset + kGatedCutlassBytes;

// The problem: dw [k, n] = x_rowsᵀ dy_rows over `rows` rows, or no tiles when *gate <= cap.
template <typename G>
__global__ void gated_write_tn_args(StagedArgs<G> args, const int32_t* __restrict__ gate, int64_t cap, int k, int n,
                                    int rows, const typename StagedArgs<G>::Element* x,
                                    const typename StagedArgs<G>::Element* dy, typename StagedArgs<G>::Element* dw,
                                    typename G::StrideA sa, typename G::StrideB sb, typename G::StrideD sd) {
  const bool skip = *gate <= cap;  // the products path wrote dw
  args.shapes[0] = {skip ? 0 : k, n, skip ? 0 : rows};
  args.a[0] = x;
  args.b[0] = dy;
  args.d[0] = dw;
  args.stride_a[0] = sa;
  args.stride_b[0] = sb;
  args.stride_d[0] = sd;
  args.row_starts[0] = 0;
}

template <typename Element>
std::string run_gated_tn(cudaStream_t stream, const void* x, const void* dy, void* dw, int64_t rows, int64_t k,
                         int64_t n, const int32_t* gate, int64_t cap, uint8_t* workspace) {
  using G = TnGemm<Element>;
  StagedArgs<G> args(workspace, 1);
  gated_write_tn_args<G><<<1, 1, 0, stream>>>(
      args, gate, cap, int(k), int(n), int(rows), static_cast<const Element*>(x), static_cast<const Element*>(dy),
      static_cast<Element*>(dw), cutlass::make_cute_packed_stride(typename G::StrideA{}, {int(k), 1, 1}),
      cutlass::make_cute_packed_stride(typename G::StrideB{}, {int(n), 1, 1}),
      cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, int(n), 1}));
  const std::string failure = run_grouped_gemm<G>(stream, args, 1, workspace + kGatedCutlassOffset,
                                                  kGatedCutlassBytes, tma_store_arguments(args));
  if (!failure.empty()) return failure;
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

// x [..., M, K], dy [..., M, N] (the same leading dims), gate: the products call's scratch, whose
// int32 at byte gate_offset is the index total; dw_in [K, N] aliased to the result dw.
ffi::Error DenseTnGatedCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::U8> gate,
                            ffi::AnyBuffer dw_in, ffi::Result<ffi::AnyBuffer> dw,
                            ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t gate_offset, int64_t cap) {
  const std::string op = "pit_dense_tn_gated: ";
  const auto xd = x.dimensions(), yd = dy.dimensions();
  if (xd.size() < 2 || yd.size() != xd.size())
    return ffi::Error::InvalidArgument(op + "x must be [..., M, K] and dy [..., M, N] with x's leading dims");
  for (size_t i = 0; i + 1 < xd.size(); ++i)
    if (xd[i] != yd[i]) return ffi::Error::InvalidArgument(op + "dy's leading dims and M must match x's");
  const int64_t k = xd[xd.size() - 1], n = yd[yd.size() - 1];
  const int64_t rows = element_count(xd) / (k > 0 ? k : 1);
  const auto dtype = x.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) || dy.element_type() != dtype ||
      dw_in.element_type() != dtype || dw->element_type() != dtype)
    return ffi::Error::InvalidArgument(op + "x, dy and dw must all be bfloat16 or all float16");
  const auto wd = dw->dimensions(), wid = dw_in.dimensions();
  if (wd.size() != 2 || wd[0] != k || wd[1] != n || wid.size() != 2 || wid[0] != k || wid[1] != n)
    return ffi::Error::InvalidArgument(op + "dw must be [K, N]");
  if (dw->untyped_data() != dw_in.untyped_data())
    return ffi::Error::InvalidArgument(op + "dw must alias its operand (input_output_aliases={3: 0})");
  if (k % 8 || n % 8) return ffi::Error::InvalidArgument(op + "K and N must be multiples of 8 (16-byte rows for TMA)");
  if (rows * std::max(k, n) >= (int64_t(1) << 31) || k * n >= (int64_t(1) << 31))
    return ffi::Error::InvalidArgument(op + "too many rows for 32-bit problem sizes");
  if (gate_offset < 0 || gate_offset % 4 || gate_offset + 4 > int64_t(gate.size_bytes()))
    return ffi::Error::InvalidArgument(op + "gate_offset must name an aligned int32 inside gate");
  if (int64_t(workspace->size_bytes()) != kGatedWorkspaceBytes)
    return ffi::Error::InvalidArgument(op + "workspace size does not match");
  int major = 0;
  current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major);
  if (major != 9)
    return ffi::Error::InvalidArgument(op + "needs a compute capability 9.0 GPU (sm_90a CUTLASS kernels); the "
                                       "lowering chose this path for one");
  // No poisoning: dw holds the products path's result, which this call may keep.
  if (k == 0 || n == 0) return ffi::Error::Success();
  if (rows == 0) {  // an empty sum; the products call (no groups) wrote the same zeros
    const cudaError_t err = cudaMemsetAsync(dw->untyped_data(), 0, k * n * 2, stream);
    return err == cudaSuccess ? ffi::Error::Success() : ffi::Error::Internal(op + cudaGetErrorString(err));
  }
  const int32_t* total = reinterpret_cast<const int32_t*>(gate.typed_data() + gate_offset);
  const std::string failure =
      dtype == ffi::DataType::BF16
          ? run_gated_tn<cutlass::bfloat16_t>(stream, x.untyped_data(), dy.untyped_data(), dw->untyped_data(), rows,
                                              k, n, total, cap, workspace->typed_data())
          : run_gated_tn<cutlass::half_t>(stream, x.untyped_data(), dy.untyped_data(), dw->untyped_data(), rows, k,
                                          n, total, cap, workspace->typed_data());
  if (!failure.empty()) return ffi::Error::Internal(op + failure);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pit

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitDenseTnGatedCuda, pit::DenseTnGatedCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Attr<int64_t>("gate_offset")
                                  .Attr<int64_t>("cap"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
