// XLA:CPU custom call (XLA FFI): 3x3 convolution, stride 1, zero padding 1 ("SAME"), float32 NHWC/HWIO,
// by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional
// Neural Networks", arXiv:1509.09308).
//
//   DiffjaxWinogradConv3x3  (x[N,H,W,C], w[3,3,C,O])  -> y[N,H,W,O]        Attribute: threads.
//
// Each 2x2 output tile is A^T [ (G g G^T) . (B^T d B) ] A over its 4x4 input patch d (rows 2ty-1..2ty+2,
// columns 2tx-1..2tx+2, zero outside the image): 16 products per input/output channel pair instead of
// the direct method's 36, i.e. 2.25x fewer multiply-adds, done as 16 matrix products
// M[k] = V[k] (tiles x C) . U[k] (C x O) by register-blocked micro-kernels (GCC vector extensions:
// AVX-512 where the machine has it). Tiles (over the whole batch, row-major) are taken in blocks of
// kBlock so that a block's V and M stay in the core's L2 cache; blocks are split over diffjax::Pool()
// threads. The input-gradient of the same
// convolution is this convolution of dy with the kernel flipped and transposed (done by the caller,
// diffjax/onednn_conv.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 48;  // tiles per block: a multiple of the micro-kernels' 6, 12 and 16 rows

typedef float Vec __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register (two AVX2 ones)

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// V[k][c] = (B^T d B)[k] for the 4x4 patch whose (r, s) channel vector is at p[4r+s] (a zero vector outside
// the image), B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], on channels [c, c + sizeof(T)/4) as T
// (Vec or float: written out so that GCC keeps every lane in registers). V[k], V[k+1] are `stride` apart.
template <typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void TransformInputAt(const float* const* p, int64_t c, float* v, int64_t stride) {
  T d[16], t[16];
  for (int i = 0; i < 16; ++i) d[i] = Ld(p[i] + c);
  for (int s = 0; s < 4; ++s) {  // t = B^T d
    t[0 + s] = d[0 + s] - d[8 + s];
    t[4 + s] = d[4 + s] + d[8 + s];
    t[8 + s] = d[8 + s] - d[4 + s];
    t[12 + s] = d[4 + s] - d[12 + s];
  }
  for (int r = 0; r < 4; ++r) {  // V = t B
    St(v + (4 * r + 0) * stride + c, t[4 * r + 0] - t[4 * r + 2]);
    St(v + (4 * r + 1) * stride + c, t[4 * r + 1] + t[4 * r + 2]);
    St(v + (4 * r + 2) * stride + c, t[4 * r + 2] - t[4 * r + 1]);
    St(v + (4 * r + 3) * stride + c, t[4 * r + 1] - t[4 * r + 3]);
  }
}

// The 2x2 outputs A^T m A (to q[2r+s]) for m[k] = M[k][o] (`stride` apart), A^T = [[1,1,1,0],[0,1,-1,-1]],
// on output channels [o, o + sizeof(T)/4).
template <typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void TransformOutputAt(const float* m, int64_t o, int64_t stride, float* const* q) {
  T t[8];
  for (int s = 0; s < 4; ++s) {  // t = A^T m
    const T m0 = Ld(m + (0 + s) * stride + o), m1 = Ld(m + (4 + s) * stride + o);
    const T m2 = Ld(m + (8 + s) * stride + o), m3 = Ld(m + (12 + s) * stride + o);
    t[s] = m0 + m1 + m2;
    t[4 + s] = m1 - m2 - m3;
  }
  for (int r = 0; r < 2; ++r) {  // y = t A
    St(q[2 * r + 0] + o, t[4 * r + 0] + t[4 * r + 1] + t[4 * r + 2]);
    St(q[2 * r + 1] + o, t[4 * r + 1] - t[4 * r + 2] - t[4 * r + 3]);
  }
}

inline float LoadScalar(const float* p) { return *p; }
inline void StoreScalar(float* p, float v) { *p = v; }

// U[k][i] = (G g G^T)[k] for g = w[:, :, i] (i = c O + o), G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]], on
// [i, i + sizeof(T)/4); U[k], U[k+1] are C O apart.
template <typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void TransformWeightsAt(const float* w, int64_t i, int64_t co, float* u) {
  T g[9], t[12];
  for (int j = 0; j < 9; ++j) g[j] = Ld(w + j * co + i);
  for (int s = 0; s < 3; ++s) {  // t = G g
    t[0 + s] = g[0 + s];
    t[3 + s] = 0.5f * (g[0 + s] + g[3 + s] + g[6 + s]);
    t[6 + s] = 0.5f * (g[0 + s] - g[3 + s] + g[6 + s]);
    t[9 + s] = g[6 + s];
  }
  for (int r = 0; r < 4; ++r) {  // U = t G^T
    St(u + (4 * r + 0) * co + i, t[3 * r + 0]);
    St(u + (4 * r + 1) * co + i, 0.5f * (t[3 * r + 0] + t[3 * r + 1] + t[3 * r + 2]));
    St(u + (4 * r + 2) * co + i, 0.5f * (t[3 * r + 0] - t[3 * r + 1] + t[3 * r + 2]));
    St(u + (4 * r + 3) * co + i, t[3 * r + 2]);
  }
}

void TransformWeights(const float* w, int64_t c_n, int64_t o_n, float* u) {
  const int64_t co = c_n * o_n;
  int64_t i = 0;
  for (; i + 16 <= co; i += 16) TransformWeightsAt<Vec, Load, Store>(w, i, co, u);
  for (; i < co; ++i) TransformWeightsAt<float, LoadScalar, StoreScalar>(w, i, co, u);
}

void TransformInput(const float* const* p, int64_t c_n, float* v, int64_t stride) {
  int64_t c = 0;
  for (; c + 16 <= c_n; c += 16) TransformInputAt<Vec, Load, Store>(p, c, v, stride);
  for (; c < c_n; ++c) TransformInputAt<float, LoadScalar, StoreScalar>(p, c, v, stride);
}

void TransformOutput(const float* m, int64_t o_n, int64_t stride, float* const* q) {
  int64_t o = 0;
  for (; o + 16 <= o_n; o += 16) TransformOutputAt<Vec, Load, Store>(m, o, stride, q);
  for (; o < o_n; ++o) TransformOutputAt<float, LoadScalar, StoreScalar>(m, o, stride, q);
}

// m[R rows][16 NV columns] = v[R rows][C] . u[C][16 NV columns] (row strides c_n, o_n, o_n): R x NV
// accumulators held in registers.
template <int R, int NV>
void MicroKernel(const float* __restrict v, const float* __restrict u, float* __restrict m, int64_t c_n,
                 int64_t o_n) {
  Vec acc[R][NV] = {};
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

// m[rows][O] = v[rows][C] . u[C][O] for rows a multiple of kRows; column blocks of 64, 32, 16, then scalar.
void Gemm(const float* v, const float* u, float* m, int64_t rows, int64_t c_n, int64_t o_n) {
  int64_t o0 = 0;
  for (; o0 + 64 <= o_n; o0 += 64)
    for (int64_t r = 0; r < rows; r += 6) MicroKernel<6, 4>(v + r * c_n, u + o0, m + r * o_n + o0, c_n, o_n);
  for (; o0 + 32 <= o_n; o0 += 32)
    for (int64_t r = 0; r < rows; r += 12) MicroKernel<12, 2>(v + r * c_n, u + o0, m + r * o_n + o0, c_n, o_n);
  for (; o0 + 16 <= o_n; o0 += 16)
    for (int64_t r = 0; r < rows; r += 16) MicroKernel<16, 1>(v + r * c_n, u + o0, m + r * o_n + o0, c_n, o_n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = o0; o < o_n; ++o) {
      float acc = 0.0f;
      for (int64_t k = 0; k < c_n; ++k) acc += v[r * c_n + k] * u[k * o_n + o];
      m[r * o_n + o] = acc;
    }
}

struct Geometry {
  int64_t n, h, w, c, o, th, tw;
  int64_t Tiles() const { return n * th * tw; }
};

// One block of tiles [t0, t1): transform the patches, 16 products, transform back into y. `zeros` holds
// C zeros (the padding), `sink` O floats (outputs past the image's edge).
void RunBlock(const Geometry& g, const float* x, const float* u, float* y, int64_t t0, int64_t t1,
              const float* zeros, float* sink, float* v, float* m) {
  const int64_t nb = t1 - t0, c_n = g.c, o_n = g.o;
  const float* p[16];
  float* q[4];
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t t = t0 + j, img = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    const float* base = x + img * g.h * g.w * c_n;
    for (int r = 0; r < 4; ++r) {
      const int64_t iy = 2 * ty - 1 + r;
      for (int s = 0; s < 4; ++s) {
        const int64_t ix = 2 * tx - 1 + s;
        const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        p[r * 4 + s] = inside ? base + (iy * g.w + ix) * c_n : zeros;
      }
    }
    TransformInput(p, c_n, v + j * c_n, kBlock * c_n);
  }
  for (int k = 0; k < 16; ++k) Gemm(v + k * kBlock * c_n, u + k * c_n * o_n, m + k * kBlock * o_n, kBlock, c_n, o_n);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t t = t0 + j, img = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    float* base = y + img * g.h * g.w * o_n;
    for (int r = 0; r < 2; ++r) {
      for (int s = 0; s < 2; ++s) {
        const int64_t oy = 2 * ty + r, ox = 2 * tx + s;
        q[r * 2 + s] = (oy < g.h && ox < g.w) ? base + (oy * g.w + ox) * o_n : sink + (r * 2 + s) * o_n;
      }
    }
    TransformOutput(m + j * o_n, o_n, kBlock * o_n, q);
  }
}

ffi::Error WinogradConv3x3(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                           int64_t threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("x, w and y must be rank 4 (NHWC, HWIO, NHWC)");
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("w must be [3, 3, C, O] with C the channels of x");
  if (yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != xd[2] || yd[3] != wd[3])
    return ffi::Error::InvalidArgument("y must be [N, H, W, O] for x [N, H, W, C] and w [3, 3, C, O]");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], wd[3], (xd[1] + 1) / 2, (xd[2] + 1) / 2};
  std::vector<float> u(16 * g.c * g.o);
  TransformWeights(w.typed_data(), g.c, g.o, u.data());
  const int64_t blocks = (g.Tiles() + kBlock - 1) / kBlock;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  const std::vector<float> zeros(g.c, 0.0f);
  std::function<void(int)> fn = [&](int i) {
    // rows past a short last block hold stale values: their products are computed and never read
    std::vector<float> v(16 * kBlock * g.c, 0.0f), m(16 * kBlock * g.o), sink(4 * g.o);
    for (int64_t b = blocks * i / chunks; b < blocks * (i + 1) / chunks; ++b) {
      RunBlock(g, x.typed_data(), u.data(), y->typed_data(), b * kBlock, std::min(g.Tiles(), (b + 1) * kBlock),
               zeros.data(), sink.data(), v.data(), m.data());
    }
  };
  diffjax::Pool().Run(static_cast<int>(chunks), fn);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxWinogradConv3x3, WinogradConv3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
