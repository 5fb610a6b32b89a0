// XLA:CPU custom calls (XLA FFI) for multi-head softmax attention, float32, recomputing backward.
//
//   DiffjaxAttentionFwd  (q[B,L,H,D], k[B,S,H,D], v[B,S,H,D])              -> out[B,L,H,D], lse[B,H,L]
//   DiffjaxAttentionBwd  (q, k, v, out, lse, dout[B,L,H,D])                -> dq, dk, dv
// Attributes: threads; the forward also vector (0/1: may it use the AVX-512 kernel for heads of 8 or 16).
//
// The same function as diffjax/models/attention_kernels.py: out = softmax(q k^T / sqrt(D)) v, saving only
// out and the per-query log-sum-exp and recomputing the probabilities in the backward pass (as in
// FlashAttention, Dao et al. 2022). Each (batch, head) pair is one task: its k and v are gathered into
// [D, S] buffers, so for every query one loop over the S keys (unit stride, vectorised, D unrolled for
// the common head sizes) serves a block of four queries: logits and exp, the output, and in the backward
// pass the updates of dk and dv in [D, S] buffers and the dq accumulators. Nothing [L, S]-sized is materialised and
// the [B, L, H, D] layout is read and written in place (no transposes around the call). Tasks are split
// over diffjax::Pool() threads. With AVX-512, heads of size 8 and 16 take ForwardTaskQueryVectors
// instead, which vectorises over queries.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "fast_exp.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t b, l, s, h, d;
};

// Key rows are padded to a multiple of 16 floats (one AVX-512 vector) so that every loop over the keys
// runs whole vectors: with S = 196 (14x14 maps) the scalar remainder loops took a third of the time.
// Padded keys and values are zero; their probabilities are set to zero before they are used.
constexpr int64_t kKeyPad = 16;
inline int64_t PaddedKeys(int64_t s) { return (s + kKeyPad - 1) / kKeyPad * kKeyPad; }

// Gathers head `hd` of batch `bi` of a [B, S, H, D] array into out[D, SP] (SP = PaddedKeys(S)).
void GatherTransposed(const float* a, const Dims& dm, int64_t bi, int64_t hd, float* out) {
  const int64_t sp = PaddedKeys(dm.s);
  for (int64_t j = 0; j < dm.s; ++j) {
    const float* src = a + ((bi * dm.s + j) * dm.h + hd) * dm.d;
    for (int64_t d = 0; d < dm.d; ++d) out[d * sp + j] = src[d];
  }
}

// Scatters out[D, SP] (its first S columns) into head `hd` of batch `bi` of a [B, S, H, D] array.
void ScatterTransposed(const float* in, const Dims& dm, int64_t bi, int64_t hd, float* a) {
  const int64_t sp = PaddedKeys(dm.s);
  for (int64_t j = 0; j < dm.s; ++j) {
    float* dst = a + ((bi * dm.s + j) * dm.h + hd) * dm.d;
    for (int64_t d = 0; d < dm.d; ++d) dst[d] = in[d * sp + j];
  }
}

constexpr int kQueryBlock = 4;  // queries that share one pass over the keys

// One (batch, head) task. DN > 0 fixes the head size at compile time; DN == 0 uses dm.d. Queries go in
// blocks of four (a short last block is padded with zero queries whose results are dropped).
template <int DN>
void ForwardTask(const Dims& dm, int64_t bi, int64_t hd, const float* q, const float* k, const float* v, float* out,
                 float* lse) {
  const int64_t D = DN > 0 ? DN : dm.d, S = PaddedKeys(dm.s);  // S: padded row length
  constexpr int QB = kQueryBlock;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> kt_(D * S, 0.0f), vt_(D * S, 0.0f), p_(QB * S);
  float* __restrict kt = kt_.data();
  float* __restrict vt = vt_.data();
  float* __restrict p = p_.data();
  GatherTransposed(k, dm, bi, hd, kt);
  GatherTransposed(v, dm, bi, hd, vt);
  for (int64_t i0 = 0; i0 < dm.l; i0 += QB) {
    const int64_t nb = std::min<int64_t>(QB, dm.l - i0);
    float qs[QB][DN > 0 ? DN : 256];
    for (int64_t b = 0; b < QB; ++b) {
      const float* qi = q + ((bi * dm.l + i0 + (b < nb ? b : 0)) * dm.h + hd) * D;
      for (int64_t d = 0; d < D; ++d) qs[b][d] = b < nb ? qi[d] * scale : 0.0f;
    }
    float* __restrict p0 = p;
    float* __restrict p1 = p + S;
    float* __restrict p2 = p + 2 * S;
    float* __restrict p3 = p + 3 * S;
    float m0 = -INFINITY, m1 = -INFINITY, m2 = -INFINITY, m3 = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      float z0 = 0.0f, z1 = 0.0f, z2 = 0.0f, z3 = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float kv = kt[d * S + j];
        z0 += qs[0][d] * kv;
        z1 += qs[1][d] * kv;
        z2 += qs[2][d] * kv;
        z3 += qs[3][d] * kv;
      }
      p0[j] = z0, p1[j] = z1, p2[j] = z2, p3[j] = z3;
    }
    for (int64_t j = 0; j < dm.s; ++j) {  // padded keys excluded
      m0 = std::max(m0, p0[j]), m1 = std::max(m1, p1[j]), m2 = std::max(m2, p2[j]), m3 = std::max(m3, p3[j]);
    }
    const float m[QB] = {m0, m1, m2, m3};
    float inv[QB];
    for (int64_t b = 0; b < QB; ++b) {
      float* __restrict pb = p + b * S;
      float denom = 0.0f;
      for (int64_t j = 0; j < S; ++j) pb[j] = diffjax::FastExp(pb[j] - m[b]);
      for (int64_t j = dm.s; j < S; ++j) pb[j] = 0.0f;
      for (int64_t j = 0; j < S; ++j) denom += pb[j];
      inv[b] = 1.0f / denom;
      if (b < nb) lse[(bi * dm.h + hd) * dm.l + i0 + b] = m[b] + std::log(denom);
    }
    for (int64_t d = 0; d < D; ++d) {
      const float* __restrict row = vt + d * S;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
      for (int64_t j = 0; j < S; ++j) {
        const float vj = row[j];
        a0 += p0[j] * vj;
        a1 += p1[j] * vj;
        a2 += p2[j] * vj;
        a3 += p3[j] * vj;
      }
      const float acc[QB] = {a0, a1, a2, a3};
      for (int64_t b = 0; b < nb; ++b) out[((bi * dm.l + i0 + b) * dm.h + hd) * D + d] = acc[b] * inv[b];
    }
  }
}

#if defined(__AVX512F__)
// AVX-512 forward for small heads (D <= 16): vectorised over sixteen queries instead of over keys. A
// block of 16 queries is held transposed in D registers (lane = query); for each key j the 16 logits
// are D fused multiply-adds with k[j, d] broadcast, the probabilities one vector exp, and the output
// update D more multiply-adds with v[j, d] broadcast into D register accumulators. No horizontal
// reductions and no reloads of probability rows (the key-vectorised ForwardTask needs both once per
// head dimension), and no key padding: a short last query block carries zero queries instead. The
// exponentials are taken in base 2 (FastExp2NonPositive16), the log-sum-exp returned in natural units.
template <int D>
void ForwardTaskQueryVectors(const Dims& dm, int64_t bi, int64_t hd, const float* q, const float* k,
                             const float* v, float* out, float* lse) {
  constexpr int QV = 16;
  const int64_t S = dm.s;
  // logits in base-2 units: p = 2^(z - m) = e^(q.k / sqrt(D) - max), with z = q.k log2(e) / sqrt(D)
  const float scale = 1.44269504088896341f / std::sqrt(static_cast<float>(D));
  std::vector<float> kc_(S * D), vc_(S * D);
  std::vector<__m512> z_(S);
  float* __restrict kc = kc_.data();
  float* __restrict vc = vc_.data();
  __m512* __restrict z = z_.data();
  for (int64_t j = 0; j < S; ++j) {  // this head's keys and values as contiguous [S, D] rows
    const int64_t at = ((bi * S + j) * dm.h + hd) * D;
    for (int d = 0; d < D; ++d) kc[j * D + d] = k[at + d], vc[j * D + d] = v[at + d];
  }
  for (int64_t i0 = 0; i0 < dm.l; i0 += QV) {
    const int64_t nb = std::min<int64_t>(QV, dm.l - i0);
    alignas(64) float qt[D][QV];
    for (int b = 0; b < QV; ++b) {
      const float* qi = q + ((bi * dm.l + i0 + (b < nb ? b : 0)) * dm.h + hd) * D;
      for (int d = 0; d < D; ++d) qt[d][b] = b < nb ? qi[d] * scale : 0.0f;
    }
    __m512 qv[D];
    for (int d = 0; d < D; ++d) qv[d] = _mm512_load_ps(qt[d]);
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 4 <= S; j += 4) {  // four keys at a time: independent multiply-add chains
      __m512 z0 = _mm512_mul_ps(qv[0], _mm512_set1_ps(kc[j * D]));
      __m512 z1 = _mm512_mul_ps(qv[0], _mm512_set1_ps(kc[(j + 1) * D]));
      __m512 z2 = _mm512_mul_ps(qv[0], _mm512_set1_ps(kc[(j + 2) * D]));
      __m512 z3 = _mm512_mul_ps(qv[0], _mm512_set1_ps(kc[(j + 3) * D]));
      for (int d = 1; d < D; ++d) {
        z0 = _mm512_fmadd_ps(qv[d], _mm512_set1_ps(kc[j * D + d]), z0);
        z1 = _mm512_fmadd_ps(qv[d], _mm512_set1_ps(kc[(j + 1) * D + d]), z1);
        z2 = _mm512_fmadd_ps(qv[d], _mm512_set1_ps(kc[(j + 2) * D + d]), z2);
        z3 = _mm512_fmadd_ps(qv[d], _mm512_set1_ps(kc[(j + 3) * D + d]), z3);
      }
      z[j] = z0, z[j + 1] = z1, z[j + 2] = z2, z[j + 3] = z3;
      m = _mm512_max_ps(m, _mm512_max_ps(_mm512_max_ps(z0, z1), _mm512_max_ps(z2, z3)));
    }
    for (; j < S; ++j) {
      __m512 zj = _mm512_mul_ps(qv[0], _mm512_set1_ps(kc[j * D]));
      for (int d = 1; d < D; ++d) zj = _mm512_fmadd_ps(qv[d], _mm512_set1_ps(kc[j * D + d]), zj);
      z[j] = zj;
      m = _mm512_max_ps(m, zj);
    }
    __m512 acc[D];
    for (int d = 0; d < D; ++d) acc[d] = _mm512_setzero_ps();
    __m512 l0 = _mm512_setzero_ps(), l1 = _mm512_setzero_ps();
    for (j = 0; j + 2 <= S; j += 2) {
      const __m512 p0 = diffjax::FastExp2NonPositive16(_mm512_sub_ps(z[j], m));
      const __m512 p1 = diffjax::FastExp2NonPositive16(_mm512_sub_ps(z[j + 1], m));
      l0 = _mm512_add_ps(l0, p0), l1 = _mm512_add_ps(l1, p1);
      for (int d = 0; d < D; ++d) {
        acc[d] = _mm512_fmadd_ps(p0, _mm512_set1_ps(vc[j * D + d]), acc[d]);
        acc[d] = _mm512_fmadd_ps(p1, _mm512_set1_ps(vc[(j + 1) * D + d]), acc[d]);
      }
    }
    for (; j < S; ++j) {
      const __m512 p0 = diffjax::FastExp2NonPositive16(_mm512_sub_ps(z[j], m));
      l0 = _mm512_add_ps(l0, p0);
      for (int d = 0; d < D; ++d) acc[d] = _mm512_fmadd_ps(p0, _mm512_set1_ps(vc[j * D + d]), acc[d]);
    }
    const __m512 l = _mm512_add_ps(l0, l1), inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l);
    alignas(64) float o[D][QV], ms[QV], ls[QV];
    for (int d = 0; d < D; ++d) _mm512_store_ps(o[d], _mm512_mul_ps(acc[d], inv));
    _mm512_store_ps(ms, m);
    _mm512_store_ps(ls, l);
    for (int64_t b = 0; b < nb; ++b) {
      float* oi = out + ((bi * dm.l + i0 + b) * dm.h + hd) * D;
      for (int d = 0; d < D; ++d) oi[d] = o[d][b];
      lse[(bi * dm.h + hd) * dm.l + i0 + b] = ms[b] * 0.693147180559945309f + std::log(ls[b]);  // natural units
    }
  }
}
#endif  // __AVX512F__

// P and dS (times the logit scale) of query `at` for every key, into p[S], ds[S]; returns nothing.
template <int DN>
void ProbabilitiesAndScores(int64_t D, int64_t S, int64_t s_real, float scale, const float* __restrict kt,
                            const float* __restrict vt, const float* qi, const float* gi, const float* oi,
                            float l_i, float* __restrict p, float* __restrict ds) {
  float qs[DN > 0 ? DN : 256], g[DN > 0 ? DN : 256];
  float delta = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    qs[d] = qi[d] * scale;
    g[d] = gi[d];
    delta += gi[d] * oi[d];
  }
  for (int64_t j = 0; j < S; ++j) {  // logits and dP = dout . v, then P and dS in the same pass
    float z = 0.0f, dp = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      z += qs[d] * kt[d * S + j];
      dp += g[d] * vt[d * S + j];
    }
    const float e = diffjax::FastExp(z - l_i);
    p[j] = e;
    ds[j] = e * (dp - delta) * scale;
  }
  for (int64_t j = s_real; j < S; ++j) p[j] = ds[j] = 0.0f;  // padded keys
}

template <int DN>
void BackwardTask(const Dims& dm, int64_t bi, int64_t hd, const float* q, const float* k, const float* v,
                  const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  const int64_t D = DN > 0 ? DN : dm.d, S = PaddedKeys(dm.s);  // S: padded row length
  constexpr int QB = kQueryBlock;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> kt_(D * S, 0.0f), vt_(D * S, 0.0f), dkt_(D * S, 0.0f), dvt_(D * S, 0.0f), p_(QB * S, 0.0f),
      ds_(QB * S, 0.0f);
  float* __restrict kt = kt_.data();
  float* __restrict vt = vt_.data();
  float* __restrict dkt = dkt_.data();
  float* __restrict dvt = dvt_.data();
  float* __restrict p = p_.data();
  float* __restrict ds = ds_.data();
  GatherTransposed(k, dm, bi, hd, kt);
  GatherTransposed(v, dm, bi, hd, vt);
  for (int64_t i0 = 0; i0 < dm.l; i0 += QB) {
    const int64_t nb = std::min<int64_t>(QB, dm.l - i0);
    int64_t at[QB];
    float qd[QB][DN > 0 ? DN : 256], g[QB][DN > 0 ? DN : 256];
    for (int64_t b = 0; b < QB; ++b) {
      // A short last block repeats its first query with zero weights (p, ds stay 0 for it).
      at[b] = ((bi * dm.l + i0 + (b < nb ? b : 0)) * dm.h + hd) * D;
      for (int64_t d = 0; d < D; ++d) {
        qd[b][d] = b < nb ? q[at[b] + d] : 0.0f;
        g[b][d] = b < nb ? dout[at[b] + d] : 0.0f;
      }
      if (b < nb) {
        ProbabilitiesAndScores<DN>(D, S, dm.s, scale, kt, vt, q + at[b], dout + at[b], out + at[b],
                                   lse[(bi * dm.h + hd) * dm.l + i0 + b], p + b * S, ds + b * S);
      } else {
        std::fill(p + b * S, p + (b + 1) * S, 0.0f);
        std::fill(ds + b * S, ds + (b + 1) * S, 0.0f);
      }
    }
    // dV[j] += sum_b P_b[j] dout_b, dK[j] += sum_b dS_b[j] q_b, dq_b = sum_j dS_b[j] k[j]: one pass.
    for (int64_t d = 0; d < D; ++d) {
      float* __restrict dvrow = dvt + d * S;
      float* __restrict dkrow = dkt + d * S;
      const float* __restrict krow = kt + d * S;
      const float g0 = g[0][d], g1 = g[1][d], g2 = g[2][d], g3 = g[3][d];
      const float q0 = qd[0][d], q1 = qd[1][d], q2 = qd[2][d], q3 = qd[3][d];
      const float *p0 = p, *p1 = p + S, *p2 = p + 2 * S, *p3 = p + 3 * S;
      const float *s0 = ds, *s1 = ds + S, *s2 = ds + 2 * S, *s3 = ds + 3 * S;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
      for (int64_t j = 0; j < S; ++j) {
        dvrow[j] += p0[j] * g0 + p1[j] * g1 + p2[j] * g2 + p3[j] * g3;
        dkrow[j] += s0[j] * q0 + s1[j] * q1 + s2[j] * q2 + s3[j] * q3;
        const float kj = krow[j];
        a0 += s0[j] * kj;
        a1 += s1[j] * kj;
        a2 += s2[j] * kj;
        a3 += s3[j] * kj;
      }
      const float acc[QB] = {a0, a1, a2, a3};
      for (int64_t b = 0; b < nb; ++b) dq[at[b] + d] = acc[b];
    }
  }
  ScatterTransposed(dkt, dm, bi, hd, dk);
  ScatterTransposed(dvt, dm, bi, hd, dv);
}

void ForTasks(const Dims& dm, int64_t threads, const std::function<void(int64_t, int64_t)>& task) {
  const int64_t n = dm.b * dm.h;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  std::function<void(int)> fn = [&](int c) {
    for (int64_t r = n * c / chunks; r < n * (c + 1) / chunks; ++r) task(r / dm.h, r % dm.h);
  };
  diffjax::Pool().Run(static_cast<int>(chunks), fn);
}

Dims DimsOf(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k) { return Dims{q[0], q[1], k[1], q[2], q[3]}; }

ffi::Error CheckHead(const Dims& dm) {
  if (dm.d > 256) return ffi::Error::InvalidArgument("head size above 256");
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t threads,
                            int64_t vector) {
  const Dims dm = DimsOf(q.dimensions(), k.dimensions());
  if (auto e = CheckHead(dm); e.failure()) return e;
  ForTasks(dm, threads, [&](int64_t bi, int64_t hd) {
    const float *a = q.typed_data(), *b = k.typed_data(), *c = v.typed_data();
    float *o = out->typed_data(), *ls = lse->typed_data();
#if defined(__AVX512F__)
    if (vector != 0 && dm.d == 8) {
      ForwardTaskQueryVectors<8>(dm, bi, hd, a, b, c, o, ls);
      return;
    }
    if (vector != 0 && dm.d == 16) {
      ForwardTaskQueryVectors<16>(dm, bi, hd, a, b, c, o, ls);
      return;
    }
#endif
    if (dm.d == 8) {
      ForwardTask<8>(dm, bi, hd, a, b, c, o, ls);
    } else if (dm.d == 16) {
      ForwardTask<16>(dm, bi, hd, a, b, c, o, ls);
    } else {
      ForwardTask<0>(dm, bi, hd, a, b, c, o, ls);
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, int64_t threads) {
  const Dims dm = DimsOf(q.dimensions(), k.dimensions());
  if (auto e = CheckHead(dm); e.failure()) return e;
  ForTasks(dm, threads, [&](int64_t bi, int64_t hd) {
    const float *a = q.typed_data(), *b = k.typed_data(), *c = v.typed_data(), *o = out.typed_data();
    const float *ls = lse.typed_data(), *g = dout.typed_data();
    float *x = dq->typed_data(), *y = dk->typed_data(), *z = dv->typed_data();
    if (dm.d == 8) {
      BackwardTask<8>(dm, bi, hd, a, b, c, o, ls, g, x, y, z);
    } else if (dm.d == 16) {
      BackwardTask<16>(dm, bi, hd, a, b, c, o, ls, g, x, y, z);
    } else {
      BackwardTask<0>(dm, bi, hd, a, b, c, o, ls, g, x, y, z);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxAttentionFwd, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("vector"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxAttentionBwd, AttentionBackward,
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
                                  .Attr<int64_t>("threads"));
