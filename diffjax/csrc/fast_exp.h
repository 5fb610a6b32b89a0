// expf that GCC inlines and vectorises (no call per 16 lanes into libmvec): the softmax and SiLU loops
// of attention.cc and group_norm.cc spend most of their time in exp.
//
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, then Cephes' degree-6 polynomial for e^r
// (Moshier, Cephes Math Library, expf.c; relative error about 2e-7 on [-87, 88]) and 2^n assembled in
// the exponent bits. Inputs are clamped to [-87, 88]: below, the result is ~1e-38 instead of 0 (a
// probability that no float sum notices); above, float overflows anyway.
#ifndef DIFFJAX_CSRC_FAST_EXP_H_
#define DIFFJAX_CSRC_FAST_EXP_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace diffjax {

inline float FastExp(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, x);  // ln2 split in two parts for an exact n * ln2_hi
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// FastExp on 16 lanes with AVX-512 intrinsics (the attention and GroupNorm vector kernels); vscalefps
// applies 2^n.
inline __m512 FastExp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 2^x on 16 lanes for x <= 0 (softmax exponents taken in base 2, their logits scaled by log2(e)
// beforehand): x = n + r with n = round(x), |r| <= 1/2 exactly, a degree-6 polynomial for 2^r (fitted
// here for relative error, about 1e-7 evaluated in float32), 2^n applied with vscalefps. Four fewer
// multiply-adds than FastExp16: no scaling by log2(e) and no two-part ln2 range reduction. Below -126
// inputs are clamped (the result is ~1e-38 instead of less).
inline __m512 FastExp2NonPositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.534580806037411e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3399930903688073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618489071726799e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550328642129898e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022646248340607e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif  // __AVX512F__

}  // namespace diffjax

#endif  // DIFFJAX_CSRC_FAST_EXP_H_
