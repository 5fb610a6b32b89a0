// XLA:CPU custom call (XLA FFI): the forward pass of a dense layer over token rows, float32.
//
//   DiffjaxDense  (x[..., K], w[K, N], b[N])  -> y[..., N] = x @ w + b        Attribute: threads.
//
// The M = prod(...) rows are split over diffjax::Pool() threads in blocks of kGemmRows, and each block is
// one register-blocked product (gemm_kernels.h, the Winograd convolution's micro-kernels: rows of x are
// contiguous, w stays in the core's L1 cache) whose accumulators start from the bias, so that y is
// written once. A short last block goes through zero-padded scratch rows. diffjax/onednn_dense.py uses
// it; tests/test_onednn_dense.py checks it against XLA's dot plus bias.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "gemm_kernels.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = diffjax::kGemmRows;

ffi::Error Dense(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), bd = b.dimensions(), yd = y->dimensions();
  if (xd.size() < 1 || wd.size() != 2 || yd.size() != xd.size())
    return ffi::Error::InvalidArgument("x must be [..., K], w [K, N] and y [..., N]");
  const int64_t k_n = wd[0], o_n = wd[1];
  if (bd.size() != 1 || bd[0] != o_n) return ffi::Error::InvalidArgument("b must be [N]");
  if (xd[xd.size() - 1] != k_n || yd[yd.size() - 1] != o_n)
    return ffi::Error::InvalidArgument("x's last axis must be w's first, y's last w's second");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) {
    if (yd[i] != xd[i]) return ffi::Error::InvalidArgument("y's leading axes must be x's");
    rows *= xd[i];
  }
  const float *xp = x.typed_data(), *wp = w.typed_data(), *bp = b.typed_data();
  float* yp = y->typed_data();
  const int64_t full = rows / kRows, blocks = full + (rows % kRows != 0);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  std::function<void(int)> fn = [&](int i) {
    for (int64_t block = blocks * i / chunks; block < blocks * (i + 1) / chunks; ++block) {
      const int64_t r0 = block * kRows;
      if (block < full) {
        diffjax::Gemm(xp + r0 * k_n, wp, yp + r0 * o_n, kRows, k_n, o_n, bp);
        continue;
      }
      const int64_t n = rows - r0;  // the short last block
      std::vector<float> xs(kRows * k_n, 0.0f), ys(kRows * o_n);
      std::memcpy(xs.data(), xp + r0 * k_n, n * k_n * sizeof(float));
      diffjax::Gemm(xs.data(), wp, ys.data(), kRows, k_n, o_n, bp);
      std::memcpy(yp + r0 * o_n, ys.data(), n * o_n * sizeof(float));
    }
  };
  diffjax::Pool().Run(static_cast<int>(chunks), fn);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxDense, Dense,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
