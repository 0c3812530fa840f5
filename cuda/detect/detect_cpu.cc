// Micro-tile detection, CPU FFI handler. Produces exactly the layout of the CUDA
// handler (see detect_layout.h), so the two agree bit for bit.
#include <cstring>
#include <vector>

#include "../common/ffi_common.h"
#include "detect_layout.h"

namespace pit {
namespace {

// Magnitude bits: a value is nonzero when any of them is set (so -0.0 is zero, NaN is not).
template <typename Bits>
constexpr Bits magnitude_mask() {
  return static_cast<Bits>(~(Bits(1) << (sizeof(Bits) * 8 - 1)));
}

template <typename Bits>
void tile_flags(const Bits* x, const DetectShape& s, std::vector<uint8_t>& flags) {
  const int64_t nb_k = s.nb_k();
  flags.assign(static_cast<size_t>(s.nb_m() * nb_k), 0);
  constexpr Bits kMag = magnitude_mask<Bits>();
  for (int64_t r = 0; r < s.rows; ++r) {
    const Bits* row = x + r * s.cols;
    uint8_t* frow = flags.data() + (r / s.tile_m) * nb_k;
    for (int64_t c = 0; c < s.cols; ++c) {
      if (row[c] & kMag) frow[c / s.tile_k] = 1;
    }
  }
}

template <typename Bits>
void detect_batch(const Bits* x, const DetectShape& s, int64_t layout, int32_t* counts,
                  int32_t* offsets, int32_t* indices) {
  std::vector<uint8_t> flags;
  const int64_t n_outer = s.n_outer(layout), n_inner = s.n_inner(layout), nb_k = s.nb_k();
  for (int64_t b = 0; b < s.batch; ++b) {
    tile_flags(x + b * s.rows * s.cols, s, flags);
    int32_t* cnt = counts + b * n_outer;
    int32_t* off = offsets + b * (n_outer + 1);
    int32_t* idx = indices + b * n_outer * n_inner;
    int32_t running = 0;
    for (int64_t o = 0; o < n_outer; ++o) {
      int32_t n = 0;
      int32_t* out = idx + o * n_inner;
      for (int64_t i = 0; i < n_inner; ++i) {
        const int64_t flat = layout == kRowMajor ? o * nb_k + i : i * nb_k + o;
        if (flags[flat]) out[n++] = static_cast<int32_t>(i);
      }
      for (int64_t i = n; i < n_inner; ++i) out[i] = -1;
      cnt[o] = n;
      off[o] = running;
      running += n;
    }
    off[n_outer] = running;
  }
}

ffi::Error DetectCpu(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::S32>> counts,
                     ffi::Result<ffi::Buffer<ffi::S32>> offsets,
                     ffi::Result<ffi::Buffer<ffi::S32>> indices, int64_t tile_m, int64_t tile_k,
                     int64_t layout) {
  DetectShape s;
  ffi::Error err = check_detect_args(x.dimensions(), tile_m, tile_k, layout, counts->dimensions(),
                                     offsets->dimensions(), indices->dimensions(), &s);
  if (err.failure()) return err;
  if (debug_poison_outputs()) {  // tests: prove every output element is written
    std::memset(counts->untyped_data(), kPoisonByte, counts->size_bytes());
    std::memset(offsets->untyped_data(), kPoisonByte, offsets->size_bytes());
    std::memset(indices->untyped_data(), kPoisonByte, indices->size_bytes());
  }
  int32_t* c = counts->typed_data();
  int32_t* o = offsets->typed_data();
  int32_t* i = indices->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::BF16:
    case ffi::DataType::F16:
      detect_batch(static_cast<const uint16_t*>(x.untyped_data()), s, layout, c, o, i);
      break;
    case ffi::DataType::F32:
      detect_batch(static_cast<const uint32_t*>(x.untyped_data()), s, layout, c, o, i);
      break;
    default:
      return ffi::Error::InvalidArgument("pit_detect: x must be bfloat16, float16 or float32");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pit

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitDetectCpu, pit::DetectCpu,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("tile_m")
                                  .Attr<int64_t>("tile_k")
                                  .Attr<int64_t>("layout"));
