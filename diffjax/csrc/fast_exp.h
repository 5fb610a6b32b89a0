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

}  // namespace diffjax

#endif  // DIFFJAX_CSRC_FAST_EXP_H_
