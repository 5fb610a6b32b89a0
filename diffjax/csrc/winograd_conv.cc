// XLA:CPU custom call (XLA FFI): 3x3 convolution, stride 1, zero padding 1 ("SAME"), float32 NHWC/HWIO,
// by Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4 (Lavin & Gray 2016, "Fast Algorithms for
// Convolutional Neural Networks", arXiv:1509.09308; the transform matrices are theirs).
//
//   DiffjaxWinogradConv3x3  (x[N,H,W,C], u[a,a,C,O])  -> y[N,H,W,O]        Attributes: tile (m), threads.
//
//   DiffjaxWinogradWeights  (w[3,3,C,O])              -> u[a,a,C,O]         Attribute: tile (m).
//
// The kernel transform u = G g G^T (a = m + 2) is its own call: inside a sampling loop the weights do
// not change, and XLA's loop-invariant code motion then runs it once before the loop instead of once
// per step and layer (diffjax/onednn_conv.py's winograd_weights).
// Each m x m output tile is A^T [ (G g G^T) . (B^T d B) ] A over its a x a input patch d, a = m + 2 (rows
// m ty - 1 .. m ty + m, likewise the columns, zero outside the image): a^2 products per input/output
// channel pair for m^2 outputs instead of the direct method's 9 m^2, i.e. 2.25x (m = 2) or 4x (m = 4)
// fewer multiply-adds, done as a^2 matrix products M[k] = V[k] (tiles x C) . U[k] (C x O) by
// register-blocked micro-kernels (GCC vector extensions: AVX-512 where the machine has it). F(4x4)
// rounds more (its transforms hold 4, 5, 8 and 1/24; errors stay within 1e-5 of the output's scale in
// tests/test_onednn_conv.py). Tiles (over the whole batch, row-major) are split evenly over
// diffjax::Pool() threads, each taking its share in blocks of at most kBlock so that a block's V and M
// stay in the core's L2 cache (a block's a^2 planes are padded apart: PlaneStride). The input gradient
// of the same convolution is this convolution of dy with the kernel rotated by 180 degrees and its
// channel axes swapped (done by the caller, diffjax/onednn_conv.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "gemm_kernels.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using diffjax::Gemm;
using diffjax::Load;
using diffjax::Store;
using diffjax::Vec;

constexpr int64_t kBlock = diffjax::kGemmRows;  // tiles per block

// Floats between the a^2 planes V[k] (channels n = C) or M[k] (n = O) of a block: kBlock rows plus one
// cache line, so that the planes do not start at the same offset modulo 4 KiB. Unpadded, a tile's a^2
// stores (and the output transform's loads) all fell into one L1 set, and far more lines than its ways.
inline int64_t PlaneStride(int64_t n) { return kBlock * n + 16; }

inline float LoadScalar(const float* p) { return *p; }
inline void StoreScalar(float* p, float v) { *p = v; }

// The transforms of F(M x M, 3x3): BT (A x A), G (A x 3), AT (M x A), A = M + 2.
template <int M>
struct Transforms;

template <>
struct Transforms<2> {
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Transforms<4> {
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{1.0f / 4, 0, 0},
                                    {-1.0f / 6, -1.0f / 6, -1.0f / 6},
                                    {-1.0f / 6, 1.0f / 6, -1.0f / 6},
                                    {1.0f / 24, 1.0f / 12, 1.0f / 6},
                                    {1.0f / 24, -1.0f / 12, 1.0f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// out[I][J] = sum_r L[I][r] x[r][J] with the constant matrix L: the zeros and ones fold away (-ffast-math).
template <int I, int R, int J, typename T>
inline void LeftMultiply(const float (&l)[I][R], const T (&x)[R][J], T (&out)[I][J]) {
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      T acc = x[0][j] * l[i][0];
#pragma GCC unroll 8
      for (int r = 1; r < R; ++r) acc += x[r][j] * l[i][r];
      out[i][j] = acc;
    }
  }
}

// out[I][J] = sum_s x[I][s] R[J][s] (x times R transposed).
template <int I, int S, int J, typename T>
inline void RightMultiplyTransposed(const T (&x)[I][S], const float (&r)[J][S], T (&out)[I][J]) {
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      T acc = x[i][0] * r[j][0];
#pragma GCC unroll 8
      for (int s = 1; s < S; ++s) acc += x[i][s] * r[j][s];
      out[i][j] = acc;
    }
  }
}

// V[k][c..] = (B^T d B)[k] for the patch whose (r, s) channel vector is at p[A r + s] (a zero vector
// outside the image), on channels [c, c + sizeof(T)/4); V[k] and V[k+1] are `stride` apart.
template <int M, typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void TransformInputAt(const float* const* p, int64_t c, float* v, int64_t stride) {
  constexpr int A = M + 2;
  T d[A][A], t[A][A], out[A][A];
  for (int r = 0; r < A; ++r)
    for (int s = 0; s < A; ++s) d[r][s] = Ld(p[r * A + s] + c);
  LeftMultiply(Transforms<M>::BT, d, t);
  RightMultiplyTransposed(t, Transforms<M>::BT, out);
  for (int r = 0; r < A; ++r)
    for (int s = 0; s < A; ++s) St(v + (r * A + s) * stride + c, out[r][s]);
}

// The M x M outputs A^T m A (to q[M r + s]) for m[k] = Mk[k][o..] (`stride` apart), on output channels
// [o, o + sizeof(T)/4).
template <int M, typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void TransformOutputAt(const float* m, int64_t o, int64_t stride, float* const* q) {
  constexpr int A = M + 2;
  T x[A][A], t[M][A], out[M][M];
  for (int r = 0; r < A; ++r)
    for (int s = 0; s < A; ++s) x[r][s] = Ld(m + (r * A + s) * stride + o);
  LeftMultiply(Transforms<M>::AT, x, t);
  RightMultiplyTransposed(t, Transforms<M>::AT, out);
  for (int r = 0; r < M; ++r)
    for (int s = 0; s < M; ++s) St(q[r * M + s] + o, out[r][s]);
}

// U[k][i..] = (G g G^T)[k] for g = w[:, :, i] (i = c O + o) on [i, i + sizeof(T)/4); U[k], U[k+1] are
// C O apart.
template <int M, typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void TransformWeightsAt(const float* w, int64_t i, int64_t co, float* u) {
  constexpr int A = M + 2;
  T g[3][3], t[A][3], out[A][A];
  for (int r = 0; r < 3; ++r)
    for (int s = 0; s < 3; ++s) g[r][s] = Ld(w + (r * 3 + s) * co + i);
  LeftMultiply(Transforms<M>::G, g, t);
  RightMultiplyTransposed(t, Transforms<M>::G, out);
  for (int r = 0; r < A; ++r)
    for (int s = 0; s < A; ++s) St(u + (r * A + s) * co + i, out[r][s]);
}

template <int M>
void TransformWeights(const float* w, int64_t c_n, int64_t o_n, float* u) {
  const int64_t co = c_n * o_n;
  int64_t i = 0;
  for (; i + 16 <= co; i += 16) TransformWeightsAt<M, Vec, Load, Store>(w, i, co, u);
  for (; i < co; ++i) TransformWeightsAt<M, float, LoadScalar, StoreScalar>(w, i, co, u);
}

template <int M>
void TransformInput(const float* const* p, int64_t c_n, float* v, int64_t stride) {
  int64_t c = 0;
  for (; c + 16 <= c_n; c += 16) TransformInputAt<M, Vec, Load, Store>(p, c, v, stride);
  for (; c < c_n; ++c) TransformInputAt<M, float, LoadScalar, StoreScalar>(p, c, v, stride);
}

template <int M>
void TransformOutput(const float* m, int64_t o_n, int64_t stride, float* const* q) {
  int64_t o = 0;
  for (; o + 16 <= o_n; o += 16) TransformOutputAt<M, Vec, Load, Store>(m, o, stride, q);
  for (; o < o_n; ++o) TransformOutputAt<M, float, LoadScalar, StoreScalar>(m, o, stride, q);
}

struct Geometry {
  int64_t n, h, w, c, o, th, tw;
  int64_t Tiles() const { return n * th * tw; }
};

// One block of tiles [t0, t1): transform the patches, A^2 products, transform back into y. `zeros` holds
// C zeros (the padding), `sink` M^2 O floats (outputs past the image's edge).
template <int M>
void RunBlock(const Geometry& g, const float* x, const float* u, float* y, int64_t t0, int64_t t1,
              const float* zeros, float* sink, float* v, float* m) {
  constexpr int A = M + 2;
  const int64_t nb = t1 - t0, c_n = g.c, o_n = g.o;
  const float* p[A * A];
  float* q[M * M];
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t t = t0 + j, img = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    const float* base = x + img * g.h * g.w * c_n;
    for (int r = 0; r < A; ++r) {
      const int64_t iy = M * ty - 1 + r;
      for (int s = 0; s < A; ++s) {
        const int64_t ix = M * tx - 1 + s;
        const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        p[r * A + s] = inside ? base + (iy * g.w + ix) * c_n : zeros;
      }
    }
    TransformInput<M>(p, c_n, v + j * c_n, PlaneStride(c_n));
  }
  // a short block: the micro-kernels run whole multiples of their rows; give the extra ones defined
  // values (their products are never read)
  const int64_t multiple = diffjax::GemmRowMultiple(o_n), rows = (nb + multiple - 1) / multiple * multiple;
  for (int k = 0; nb < rows && k < A * A; ++k) {
    std::memset(v + k * PlaneStride(c_n) + nb * c_n, 0, (rows - nb) * c_n * sizeof(float));
  }
  for (int k = 0; k < A * A; ++k) {
    Gemm(v + k * PlaneStride(c_n), u + k * c_n * o_n, m + k * PlaneStride(o_n), rows, c_n, o_n);
  }
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t t = t0 + j, img = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    float* base = y + img * g.h * g.w * o_n;
    for (int r = 0; r < M; ++r) {
      for (int s = 0; s < M; ++s) {
        const int64_t oy = M * ty + r, ox = M * tx + s;
        q[r * M + s] = (oy < g.h && ox < g.w) ? base + (oy * g.w + ox) * o_n : sink + (r * M + s) * o_n;
      }
    }
    TransformOutput<M>(m + j * o_n, o_n, PlaneStride(o_n), q);
  }
}

template <int M>
void Run(const Geometry& g, const float* x, const float* u, float* y, int64_t threads) {
  constexpr int A = M + 2;
  // each chunk takes an equal share of the tiles, in blocks of at most kBlock
  const int64_t tiles = g.Tiles(), blocks = (tiles + kBlock - 1) / kBlock;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  const std::vector<float> zeros(g.c, 0.0f);
  std::function<void(int)> fn = [&](int i) {
    // per-thread scratch, left uninitialised: RunBlock writes every element it reads
    std::unique_ptr<float[]> v(new float[A * A * PlaneStride(g.c)]), m(new float[A * A * PlaneStride(g.o)]);
    std::unique_ptr<float[]> sink(new float[M * M * g.o]);
    const int64_t end = tiles * (i + 1) / chunks;
    for (int64_t t0 = tiles * i / chunks; t0 < end; t0 += kBlock) {
      RunBlock<M>(g, x, u, y, t0, std::min(end, t0 + kBlock), zeros.data(), sink.get(), v.get(), m.get());
    }
  };
  diffjax::Pool().Run(static_cast<int>(chunks), fn);
}

ffi::Error WinogradConv3x3(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> y,
                           int64_t tile, int64_t threads) {
  const auto xd = x.dimensions(), wd = u.dimensions(), yd = y->dimensions();
  if (tile != 2 && tile != 4) return ffi::Error::InvalidArgument("tile must be 2 or 4");
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("x, u and y must be rank 4 (NHWC, [a, a, C, O], NHWC)");
  if (wd[0] != tile + 2 || wd[1] != tile + 2 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("u must be [tile + 2, tile + 2, C, O] with C the channels of x");
  if (yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != xd[2] || yd[3] != wd[3])
    return ffi::Error::InvalidArgument("y must be [N, H, W, O] for x [N, H, W, C] and u [a, a, C, O]");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], wd[3], (xd[1] + tile - 1) / tile, (xd[2] + tile - 1) / tile};
  if (tile == 2) {
    Run<2>(g, x.typed_data(), u.typed_data(), y->typed_data(), threads);
  } else {
    Run<4>(g, x.typed_data(), u.typed_data(), y->typed_data(), threads);
  }
  return ffi::Error::Success();
}

ffi::Error WinogradWeights(ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> u, int64_t tile) {
  const auto wd = w.dimensions(), ud = u->dimensions();
  if (tile != 2 && tile != 4) return ffi::Error::InvalidArgument("tile must be 2 or 4");
  if (wd.size() != 4 || wd[0] != 3 || wd[1] != 3) return ffi::Error::InvalidArgument("w must be [3, 3, C, O]");
  if (ud.size() != 4 || ud[0] != tile + 2 || ud[1] != tile + 2 || ud[2] != wd[2] || ud[3] != wd[3])
    return ffi::Error::InvalidArgument("u must be [tile + 2, tile + 2, C, O] for w [3, 3, C, O]");
  if (tile == 2) {
    TransformWeights<2>(w.typed_data(), wd[2], wd[3], u->typed_data());
  } else {
    TransformWeights<4>(w.typed_data(), wd[2], wd[3], u->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxWinogradWeights, WinogradWeights,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxWinogradConv3x3, WinogradConv3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("threads"));
