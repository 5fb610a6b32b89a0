// XLA:CPU custom calls (XLA FFI) for multi-head softmax attention, float32, recomputing backward.
//
//   DiffjaxAttentionFwd  (q[B,L,H,D], k[B,S,H,D], v[B,S,H,D])              -> out[B,L,H,D], lse[B,H,L]
//   DiffjaxAttentionBwd  (q, k, v, out, lse, dout[B,L,H,D])                -> dq, dk, dv
// Attribute: threads.
//
// The same function as diffjax/models/attention_kernels.py: out = softmax(q k^T / sqrt(D)) v, saving only
// out and the per-query log-sum-exp and recomputing the probabilities in the backward pass (as in
// FlashAttention, Dao et al. 2022). Each (batch, head) pair is one task: its k and v are gathered into
// [D, S] buffers, so for every query one loop over the S keys (unit stride, vectorised, D unrolled for
// the common head sizes) does all the work: logits, exp, and in the backward pass the gradient updates
// of dk and dv in [D, S] buffers and dq in vector accumulators. Nothing [L, S]-sized is materialised and
// the [B, L, H, D] layout is read and written in place (no transposes around the call). Tasks are split
// over diffjax::Pool() threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t b, l, s, h, d;
};

// Gathers head `hd` of batch `bi` of a [B, S, H, D] array into out[D, S].
void GatherTransposed(const float* a, const Dims& dm, int64_t bi, int64_t hd, float* out) {
  for (int64_t j = 0; j < dm.s; ++j) {
    const float* src = a + ((bi * dm.s + j) * dm.h + hd) * dm.d;
    for (int64_t d = 0; d < dm.d; ++d) out[d * dm.s + j] = src[d];
  }
}

// Scatters out[D, S] into head `hd` of batch `bi` of a [B, S, H, D] array.
void ScatterTransposed(const float* in, const Dims& dm, int64_t bi, int64_t hd, float* a) {
  for (int64_t j = 0; j < dm.s; ++j) {
    float* dst = a + ((bi * dm.s + j) * dm.h + hd) * dm.d;
    for (int64_t d = 0; d < dm.d; ++d) dst[d] = in[d * dm.s + j];
  }
}

// One (batch, head) task. DN > 0 fixes the head size at compile time; DN == 0 uses dm.d.
template <int DN>
void ForwardTask(const Dims& dm, int64_t bi, int64_t hd, const float* q, const float* k, const float* v, float* out,
                 float* lse) {
  const int64_t D = DN > 0 ? DN : dm.d, S = dm.s;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> kt(D * S), vt(D * S), p(S);
  GatherTransposed(k, dm, bi, hd, kt.data());
  GatherTransposed(v, dm, bi, hd, vt.data());
  for (int64_t i = 0; i < dm.l; ++i) {
    const float* qi = q + ((bi * dm.l + i) * dm.h + hd) * D;
    float qs[DN > 0 ? DN : 256];
    for (int64_t d = 0; d < D; ++d) qs[d] = qi[d] * scale;
    float m = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      float z = 0.0f;
      for (int64_t d = 0; d < D; ++d) z += qs[d] * kt[d * S + j];
      p[j] = z;
      m = std::max(m, z);
    }
    float denom = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const float e = std::exp(p[j] - m);
      p[j] = e;
      denom += e;
    }
    float* oi = out + ((bi * dm.l + i) * dm.h + hd) * D;
    const float inv = 1.0f / denom;
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.0f;
      const float* row = vt.data() + d * S;
      for (int64_t j = 0; j < S; ++j) acc += p[j] * row[j];
      oi[d] = acc * inv;
    }
    lse[(bi * dm.h + hd) * dm.l + i] = m + std::log(denom);
  }
}

template <int DN>
void BackwardTask(const Dims& dm, int64_t bi, int64_t hd, const float* q, const float* k, const float* v,
                  const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  const int64_t D = DN > 0 ? DN : dm.d, S = dm.s;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> kt_(D * S), vt_(D * S), dkt_(D * S, 0.0f), dvt_(D * S, 0.0f), p_(S), ds_(S);
  float* __restrict kt = kt_.data();
  float* __restrict vt = vt_.data();
  float* __restrict dkt = dkt_.data();
  float* __restrict dvt = dvt_.data();
  float* __restrict p = p_.data();
  float* __restrict ds = ds_.data();
  GatherTransposed(k, dm, bi, hd, kt);
  GatherTransposed(v, dm, bi, hd, vt);
  for (int64_t i = 0; i < dm.l; ++i) {
    const int64_t at = ((bi * dm.l + i) * dm.h + hd) * D;
    const float l_i = lse[(bi * dm.h + hd) * dm.l + i];
    float qs[DN > 0 ? DN : 256], qd[DN > 0 ? DN : 256], g[DN > 0 ? DN : 256];
    float delta = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      qd[d] = q[at + d];
      qs[d] = qd[d] * scale;
      g[d] = dout[at + d];
      delta += g[d] * out[at + d];
    }
    // Logits and dP = dout . v for every key, then P and dS = P (dP - delta) (times the logit scale).
    for (int64_t j = 0; j < S; ++j) {
      float z = 0.0f, dp = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        z += qs[d] * kt[d * S + j];
        dp += g[d] * vt[d * S + j];
      }
      p[j] = z;
      ds[j] = dp;
    }
    for (int64_t j = 0; j < S; ++j) {
      const float e = std::exp(p[j] - l_i);
      p[j] = e;
      ds[j] = e * (ds[j] - delta) * scale;
    }
    // dV[j] += P[j] dout, dK[j] += dS[j] q, dq = sum_j dS[j] k[j].
    for (int64_t d = 0; d < D; ++d) {
      const float gd = g[d], qv = qd[d];
      float* __restrict dvrow = dvt + d * S;
      float* __restrict dkrow = dkt + d * S;
      const float* __restrict krow = kt + d * S;
      float acc = 0.0f;
      for (int64_t j = 0; j < S; ++j) {
        dvrow[j] += p[j] * gd;
        dkrow[j] += ds[j] * qv;
        acc += ds[j] * krow[j];
      }
      dq[at + d] = acc;
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
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t threads) {
  const Dims dm = DimsOf(q.dimensions(), k.dimensions());
  if (auto e = CheckHead(dm); e.failure()) return e;
  ForTasks(dm, threads, [&](int64_t bi, int64_t hd) {
    const float *a = q.typed_data(), *b = k.typed_data(), *c = v.typed_data();
    float *o = out->typed_data(), *ls = lse->typed_data();
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
                                  .Attr<int64_t>("threads"));

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
