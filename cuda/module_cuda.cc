// Python module exposing the CUDA FFI handlers as capsules. cudart is linked statically, so
// this module imports on machines without a GPU or driver; XLA defers CUDA registration there.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/api.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(PitDetectCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitSparseDenseCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitSparseDenseDetectCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitSparseTnCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitSparseNtCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitSparseTnProductsCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitSparseTnProductsDetectCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitMoeMatmulCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitMoeFusedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitMoeMatmulTnCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitMoeRouteCuda);
#if PIT_HAVE_CUTLASS
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitMoeMatmulStagedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitMoeMatmulTnStagedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(PitDenseTnGatedCuda);
#endif

NB_MODULE(_pit_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["pit_detect"] = nb::capsule(reinterpret_cast<void*>(PitDetectCuda));
    targets["pit_sparse_dense"] = nb::capsule(reinterpret_cast<void*>(PitSparseDenseCuda));
    targets["pit_sparse_dense_detect"] = nb::capsule(reinterpret_cast<void*>(PitSparseDenseDetectCuda));
    targets["pit_sparse_tn"] = nb::capsule(reinterpret_cast<void*>(PitSparseTnCuda));
    targets["pit_sparse_nt"] = nb::capsule(reinterpret_cast<void*>(PitSparseNtCuda));
    targets["pit_sparse_tn_products"] = nb::capsule(reinterpret_cast<void*>(PitSparseTnProductsCuda));
    targets["pit_sparse_tn_products_detect"] = nb::capsule(reinterpret_cast<void*>(PitSparseTnProductsDetectCuda));
    targets["pit_moe_matmul"] = nb::capsule(reinterpret_cast<void*>(PitMoeMatmulCuda));
    targets["pit_moe_fused"] = nb::capsule(reinterpret_cast<void*>(PitMoeFusedCuda));
    targets["pit_moe_matmul_tn"] = nb::capsule(reinterpret_cast<void*>(PitMoeMatmulTnCuda));
    targets["pit_moe_route"] = nb::capsule(reinterpret_cast<void*>(PitMoeRouteCuda));
#if PIT_HAVE_CUTLASS  // the staged MoE forward (CUTLASS grouped GEMM), built when CUTLASS was found
    targets["pit_moe_matmul_staged"] = nb::capsule(reinterpret_cast<void*>(PitMoeMatmulStagedCuda));
    targets["pit_moe_matmul_tn_staged"] = nb::capsule(reinterpret_cast<void*>(PitMoeMatmulTnStagedCuda));
    targets["pit_dense_tn_gated"] = nb::capsule(reinterpret_cast<void*>(PitDenseTnGatedCuda));  // k-gather dW
#endif
    return targets;
  });
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("cuda_architectures") = PIT_CUDA_ARCHS;
  m.attr("moe_staged") = bool(PIT_HAVE_CUTLASS);
}
