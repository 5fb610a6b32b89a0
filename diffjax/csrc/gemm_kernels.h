// Register-blocked float32 matrix products for diffjax's CPU custom calls: the Winograd convolution's
// per-point products (winograd_conv.cc) and the dense forward (dense.cc). GCC vector extensions: one Vec
// is an AVX-512 register where the machine has it, two AVX2 ones otherwise.
#ifndef DIFFJAX_CSRC_GEMM_KERNELS_H_
#define DIFFJAX_CSRC_GEMM_KERNELS_H_

#include <cstdint>
#include <cstring>
#include <numeric>

namespace diffjax {

constexpr int64_t kGemmRows = 48;  // the row multiple Gemm needs: a multiple of 6, 12 and 16

typedef float Vec __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register (two AVX2 ones)

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// m[R rows][16 NV columns] = v[R rows][C] . u[C][16 NV columns] (+ bias[16 NV] when given; row strides
// c_n, o_n, o_n): R x NV accumulators held in registers.
template <int R, int NV>
void MicroKernel(const float* __restrict v, const float* __restrict u, float* __restrict m, int64_t c_n,
                 int64_t o_n, const float* __restrict bias) {
  Vec acc[R][NV] = {};
  if (bias != nullptr)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = Load(bias + 16 * j);
  for (int64_t k = 0; k < c_n; ++k) {
    Vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = Load(u + k * o_n + 16 * j);
    for (int r = 0; r < R; ++r) {
      const float a = v[r * c_n + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) Store(m + r * o_n + 16 * j, acc[r][j]);
}

// The row multiple Gemm needs for O output columns: the row counts of the micro-kernels it uses.
inline int64_t GemmRowMultiple(int64_t o_n) {
  int64_t multiple = 1, rest = o_n;
  if (rest >= 64) multiple = 6, rest %= 64;
  if (rest >= 32) multiple = std::lcm(multiple, int64_t{12}), rest -= 32;
  if (rest >= 16) multiple = std::lcm(multiple, int64_t{16});
  return multiple;
}

// m[rows][O] = v[rows][C] . u[C][O] (+ bias[O] when not null) for rows a multiple of GemmRowMultiple(O)
// (kGemmRows is one for every O); column blocks of 64, 32, 16, then scalar.
inline void Gemm(const float* v, const float* u, float* m, int64_t rows, int64_t c_n, int64_t o_n,
                 const float* bias = nullptr) {
  int64_t o0 = 0;
  const auto b = [&](int64_t o) { return bias == nullptr ? nullptr : bias + o; };
  for (; o0 + 64 <= o_n; o0 += 64)
    for (int64_t r = 0; r < rows; r += 6) MicroKernel<6, 4>(v + r * c_n, u + o0, m + r * o_n + o0, c_n, o_n, b(o0));
  for (; o0 + 32 <= o_n; o0 += 32)
    for (int64_t r = 0; r < rows; r += 12) MicroKernel<12, 2>(v + r * c_n, u + o0, m + r * o_n + o0, c_n, o_n, b(o0));
  for (; o0 + 16 <= o_n; o0 += 16)
    for (int64_t r = 0; r < rows; r += 16) MicroKernel<16, 1>(v + r * c_n, u + o0, m + r * o_n + o0, c_n, o_n, b(o0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = o0; o < o_n; ++o) {
      float acc = bias == nullptr ? 0.0f : bias[o];
      for (int64_t k = 0; k < c_n; ++k) acc += v[r * c_n + k] * u[k * o_n + o];
      m[r * o_n + o] = acc;
    }
}

}  // namespace diffjax

#endif  // DIFFJAX_CSRC_GEMM_KERNELS_H_
