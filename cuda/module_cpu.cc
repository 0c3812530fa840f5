// Python module exposing the CPU FFI handlers as capsules for jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/api.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(PitDetectCpu);

NB_MODULE(_pit_cpu, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["pit_detect"] = nb::capsule(reinterpret_cast<void*>(PitDetectCpu));
    return targets;
  });
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
