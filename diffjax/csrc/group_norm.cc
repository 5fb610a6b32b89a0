// XLA:CPU custom calls (XLA FFI) for GroupNorm (optionally followed by SiLU), float32, channels last.
//
//   DiffjaxGroupNormFwd  (x[B,...,C], scale[C], bias[C])                 -> y, mean[B,G], rstd[B,G]
//   DiffjaxGroupNormBwd  (x, scale, bias, mean, rstd, dy)               -> dx, dscale[C], dbias[C]
// Attributes: groups, eps, silu (0/1), threads; the forward also vector (0/1: may it use the AVX-512
// kernel).
//
// The same math as diffjax/models/group_norm.py (Wu & He 2018, "Group Normalization"; two-pass
// variance; backward differentiated by hand): per image, channel sums over the spatial positions with
// the channels contiguous (the inner loops vectorise over C), group statistics from them, then one
// affine pass ``x * a[c] + d[c]``. Each image's slice is read a few times while it sits in cache, where
// XLA's fusions stream the whole batch per pass. Images are split over diffjax::Pool() threads. With
// AVX-512 and C a multiple of 16 up to 128, the forward takes ForwardImageVectors (two passes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fast_exp.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t b, s, c, g;
};

Shape ShapeOf(ffi::Span<const int64_t> dims, int64_t groups) {
  int64_t s = 1;
  for (size_t i = 1; i + 1 < dims.size(); ++i) s *= dims[i];
  return Shape{dims[0], s, dims[dims.size() - 1], groups};
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + diffjax::FastExp(-z)); }

// Per-channel mean of the groups (mc), and a, d with norm(x) * scale + bias = x * a + d.
void Coefficients(const Shape& sh, const float* scale, const float* bias, const float* mean, const float* rstd,
                  float* mc, float* rc, float* a, float* d) {
  const int64_t cg = sh.c / sh.g;
  for (int64_t c = 0; c < sh.c; ++c) {
    mc[c] = mean[c / cg];
    rc[c] = rstd[c / cg];
    a[c] = rc[c] * scale[c];
    d[c] = bias[c] - mc[c] * a[c];
  }
}

void ForwardImage(const Shape& sh, const float* x, const float* scale, const float* bias, float eps, bool silu,
                  float* y, float* mean, float* rstd) {
  const int64_t c_n = sh.c, cg = sh.c / sh.g;
  const double n = static_cast<double>(sh.s * cg);
  std::vector<float> acc(c_n, 0.0f), mc(c_n), rc(c_n), a(c_n), d(c_n);
  for (int64_t s = 0; s < sh.s; ++s) {
    const float* row = x + s * c_n;
    for (int64_t c = 0; c < c_n; ++c) acc[c] += row[c];
  }
  for (int64_t g = 0; g < sh.g; ++g) {
    double total = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) total += acc[c];
    mean[g] = static_cast<float>(total / n);
  }
  for (int64_t c = 0; c < c_n; ++c) mc[c] = mean[c / cg], acc[c] = 0.0f;
  for (int64_t s = 0; s < sh.s; ++s) {
    const float* row = x + s * c_n;
    for (int64_t c = 0; c < c_n; ++c) {
      const float v = row[c] - mc[c];
      acc[c] += v * v;
    }
  }
  for (int64_t g = 0; g < sh.g; ++g) {
    double total = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) total += acc[c];
    rstd[g] = static_cast<float>(1.0 / std::sqrt(total / n + static_cast<double>(eps)));
  }
  Coefficients(sh, scale, bias, mean, rstd, mc.data(), rc.data(), a.data(), d.data());
  for (int64_t s = 0; s < sh.s; ++s) {
    const float* row = x + s * c_n;
    float* out = y + s * c_n;
    if (silu) {
      for (int64_t c = 0; c < c_n; ++c) {
        const float z = row[c] * a[c] + d[c];
        out[c] = z * Sigmoid(z);
      }
    } else {
      for (int64_t c = 0; c < c_n; ++c) out[c] = row[c] * a[c] + d[c];
    }
  }
}

#if defined(__AVX512F__)
// AVX-512 forward for channel counts that are whole vectors (C = 16 NC, NC <= 8: every U-Net width
// up to 128): the channels of one spatial position sit in NC registers. Two passes instead of three:
// per-channel sums of (x - x0) and (x - x0)^2 around the image's first position x0 (shifted data,
// so no cancellation while the channel's spread is small next to its mean), merged into group
// statistics as in Chan, Golub & LeVeque 1983 (within-channel variance plus the spread of the channel
// means), then the affine pass with SiLU's 1 / (1 + e^-z) as a reciprocal estimate refined by one
// Newton step.
template <int NC, bool SILU>
void ForwardImageVectors(const Shape& sh, const float* __restrict x, const float* scale, const float* bias,
                         float eps, float* __restrict y, float* mean, float* rstd) {
  constexpr int64_t C = 16 * NC;
  const int64_t cg = C / sh.g, S = sh.s;
  __m512 x0[NC], s1[NC], s2[NC];
  for (int c = 0; c < NC; ++c) {
    x0[c] = _mm512_loadu_ps(x + 16 * c);
    s1[c] = s2[c] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int c = 0; c < NC; ++c) {
      const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + s * C + 16 * c), x0[c]);
      s1[c] = _mm512_add_ps(s1[c], v);
      s2[c] = _mm512_fmadd_ps(v, v, s2[c]);
    }
  }
  alignas(64) float base[C], m1[C], m2[C], a[C], d[C];
  for (int c = 0; c < NC; ++c) {
    _mm512_store_ps(base + 16 * c, x0[c]);
    _mm512_store_ps(m1 + 16 * c, s1[c]);
    _mm512_store_ps(m2 + 16 * c, s2[c]);
  }
  for (int64_t g = 0; g < sh.g; ++g) {
    double mu[128], within = 0.0, total = 0.0;  // per-channel means; within-channel variances
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const double e1 = m1[c] / static_cast<double>(S);
      mu[c - g * cg] = base[c] + e1;
      within += std::max(m2[c] / static_cast<double>(S) - e1 * e1, 0.0);
      total += mu[c - g * cg];
    }
    const double mg = total / static_cast<double>(cg);
    double spread = 0.0;
    for (int64_t i = 0; i < cg; ++i) spread += (mu[i] - mg) * (mu[i] - mg);
    const double var = (within + spread) / static_cast<double>(cg);
    mean[g] = static_cast<float>(mg);
    rstd[g] = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      a[c] = rstd[g] * scale[c];
      d[c] = bias[c] - mean[g] * a[c];
    }
  }
  __m512 av[NC], dv[NC];
  for (int c = 0; c < NC; ++c) av[c] = _mm512_load_ps(a + 16 * c), dv[c] = _mm512_load_ps(d + 16 * c);
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (int64_t s = 0; s < S; ++s) {
    for (int c = 0; c < NC; ++c) {
      __m512 z = _mm512_fmadd_ps(_mm512_loadu_ps(x + s * C + 16 * c), av[c], dv[c]);
      if constexpr (SILU) {
        const __m512 den = _mm512_add_ps(one, diffjax::FastExp16(_mm512_sub_ps(_mm512_setzero_ps(), z)));
        __m512 r = _mm512_rcp14_ps(den);
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, two));  // r (2 - den r)
        z = _mm512_mul_ps(z, r);
      }
      _mm512_storeu_ps(y + s * C + 16 * c, z);
    }
  }
}

template <int NC>
void ForwardImageVectorsSilu(const Shape& sh, const float* x, const float* scale, const float* bias, float eps,
                             bool silu, float* y, float* mean, float* rstd) {
  if (silu) {
    ForwardImageVectors<NC, true>(sh, x, scale, bias, eps, y, mean, rstd);
  } else {
    ForwardImageVectors<NC, false>(sh, x, scale, bias, eps, y, mean, rstd);
  }
}

// The vector forward for this shape, or nullptr (then ForwardImage).
using ForwardFn = void (*)(const Shape&, const float*, const float*, const float*, float, bool, float*, float*,
                           float*);
ForwardFn VectorForward(const Shape& sh) {
  if (sh.c % 16 != 0 || sh.c > 128 || sh.s < 1) return nullptr;
  constexpr ForwardFn table[8] = {ForwardImageVectorsSilu<1>, ForwardImageVectorsSilu<2>, ForwardImageVectorsSilu<3>,
                                  ForwardImageVectorsSilu<4>, ForwardImageVectorsSilu<5>, ForwardImageVectorsSilu<6>,
                                  ForwardImageVectorsSilu<7>, ForwardImageVectorsSilu<8>};
  return table[sh.c / 16 - 1];
}
#else
using ForwardFn = void (*)(const Shape&, const float*, const float*, const float*, float, bool, float*, float*,
                           float*);
ForwardFn VectorForward(const Shape&) { return nullptr; }
#endif  // __AVX512F__

// First backward pass over one image: the cotangent g of the normalised output (through SiLU when
// SILU) into out, and per channel the sums of g and g (x - mean). Restrict-qualified and with the SiLU
// branch hoisted so that GCC vectorises it (with the branch inside, it ran scalar, exp by exp).
template <bool SILU>
void CotangentPass(int64_t n_s, int64_t c_n, const float* __restrict x, const float* __restrict dy,
                   const float* __restrict a, const float* __restrict d, const float* __restrict mc,
                   float* __restrict out, float* __restrict sum_g, float* __restrict sum_gx) {
  for (int64_t s = 0; s < n_s; ++s) {
    const float* __restrict row = x + s * c_n;
    const float* __restrict grow = dy + s * c_n;
    float* __restrict o = out + s * c_n;
    for (int64_t c = 0; c < c_n; ++c) {
      float g = grow[c];
      if constexpr (SILU) {  // d silu(z) / dz = sig (1 + z (1 - sig))
        const float z = row[c] * a[c] + d[c];
        const float sig = Sigmoid(z);
        g *= sig * (1.0f + z * (1.0f - sig));
      }
      o[c] = g;
      sum_g[c] += g;
      sum_gx[c] += g * (row[c] - mc[c]);
    }
  }
}

// dx for one image; adds the image's d(scale), d(bias) contributions to dscale, dbias.
void BackwardImage(const Shape& sh, const float* x, const float* scale, const float* bias, const float* mean,
                   const float* rstd, const float* dy, bool silu, float* dx, float* dscale, float* dbias) {
  const int64_t c_n = sh.c, cg = sh.c / sh.g;
  const float n = static_cast<float>(sh.s * cg);
  std::vector<float> mc(c_n), rc(c_n), a(c_n), d(c_n), sum_g(c_n, 0.0f), sum_gx(c_n, 0.0f);
  Coefficients(sh, scale, bias, mean, rstd, mc.data(), rc.data(), a.data(), d.data());
  // dx holds the cotangent of the normalised output for now
  if (silu) {
    CotangentPass<true>(sh.s, c_n, x, dy, a.data(), d.data(), mc.data(), dx, sum_g.data(), sum_gx.data());
  } else {
    CotangentPass<false>(sh.s, c_n, x, dy, a.data(), d.data(), mc.data(), dx, sum_g.data(), sum_gx.data());
  }
  std::vector<float> m1(sh.g, 0.0f), m2(sh.g, 0.0f);
  for (int64_t c = 0; c < c_n; ++c) {
    sum_gx[c] *= rc[c];
    dscale[c] += sum_gx[c];
    dbias[c] += sum_g[c];
    m1[c / cg] += sum_g[c] * scale[c];
    m2[c / cg] += sum_gx[c] * scale[c];
  }
  std::vector<float> p(c_n), q(c_n), r(c_n);
  for (int64_t c = 0; c < c_n; ++c) {
    const float g1 = m1[c / cg] / n, g2 = m2[c / cg] / n;
    p[c] = rc[c] * scale[c];
    q[c] = -rc[c] * rc[c] * g2;
    r[c] = -rc[c] * g1 - mc[c] * q[c];
  }
  for (int64_t s = 0; s < sh.s; ++s) {
    const float* row = x + s * c_n;
    float* out = dx + s * c_n;
    for (int64_t c = 0; c < c_n; ++c) out[c] = out[c] * p[c] + row[c] * q[c] + r[c];
  }
}

ffi::Error CheckGroups(const Shape& sh) {
  if (sh.g < 1 || sh.c % sh.g != 0) return ffi::Error::InvalidArgument("groups must divide the channels");
  return ffi::Error::Success();
}

int64_t Chunks(int64_t threads, int64_t b) { return std::max<int64_t>(1, std::min<int64_t>(threads, b)); }

ffi::Error GroupNormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd, int64_t groups, float eps, int64_t silu,
                            int64_t threads, int64_t vector) {
  const Shape sh = ShapeOf(x.dimensions(), groups);
  if (auto e = CheckGroups(sh); e.failure()) return e;
  const int64_t chunks = Chunks(threads, sh.b), image = sh.s * sh.c;
  const ForwardFn image_fn = vector != 0 && VectorForward(sh) ? VectorForward(sh) : ForwardImage;
  std::function<void(int)> fn = [&](int i) {
    for (int64_t b = sh.b * i / chunks; b < sh.b * (i + 1) / chunks; ++b) {
      image_fn(sh, x.typed_data() + b * image, scale.typed_data(), bias.typed_data(), eps, silu != 0,
                   y->typed_data() + b * image, mean->typed_data() + b * sh.g, rstd->typed_data() + b * sh.g);
    }
  };
  diffjax::Pool().Run(static_cast<int>(chunks), fn);
  return ffi::Error::Success();
}

ffi::Error GroupNormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                             ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias, int64_t groups, int64_t silu, int64_t threads) {
  const Shape sh = ShapeOf(x.dimensions(), groups);
  if (auto e = CheckGroups(sh); e.failure()) return e;
  const int64_t chunks = Chunks(threads, sh.b), image = sh.s * sh.c;
  std::vector<std::vector<float>> part_scale(chunks, std::vector<float>(sh.c, 0.0f));
  std::vector<std::vector<float>> part_bias(chunks, std::vector<float>(sh.c, 0.0f));
  std::function<void(int)> fn = [&](int i) {
    for (int64_t b = sh.b * i / chunks; b < sh.b * (i + 1) / chunks; ++b) {
      BackwardImage(sh, x.typed_data() + b * image, scale.typed_data(), bias.typed_data(),
                    mean.typed_data() + b * sh.g, rstd.typed_data() + b * sh.g, dy.typed_data() + b * image,
                    silu != 0, dx->typed_data() + b * image, part_scale[i].data(), part_bias[i].data());
    }
  };
  diffjax::Pool().Run(static_cast<int>(chunks), fn);
  for (int64_t c = 0; c < sh.c; ++c) {
    float ds = 0.0f, db = 0.0f;
    for (int64_t i = 0; i < chunks; ++i) ds += part_scale[i][c], db += part_bias[i][c];
    dscale->typed_data()[c] = ds;
    dbias->typed_data()[c] = db;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxGroupNormFwd, GroupNormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("silu")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("vector"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxGroupNormBwd, GroupNormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("silu")
                                  .Attr<int64_t>("threads"));
