// XLA:CPU custom calls (XLA FFI) running 2-D convolutions with oneDNN, for diffjax.onednn_conv.
//
// Three handlers, all float32 with NHWC activations and HWIO kernels (Flax's layout), no dilation,
// one group:
//   DiffjaxOnednnConvFwd          (x[N,H,W,C], w[KH,KW,C,O])  -> y[N,OH,OW,O]
//   DiffjaxOnednnConvBwdData      (dy[N,OH,OW,O], w)          -> dx[N,H,W,C]
//   DiffjaxOnednnConvBwdWeights   (x, dy)                     -> dw[KH,KW,C,O]
// Attributes: sh, sw (strides), pt, pb, pl, pr (top/bottom/left/right zero padding), threads.
//
// oneDNN (https://github.com/oneapi-src/oneDNN, Apache-2.0) picks its JIT kernel for the machine; the
// kernels read and write NHWC directly, and the kernel tensor is reordered to the layout the chosen
// implementation prefers (``format_tag::any``) on each call (kernels are small). The API follows
// oneDNN's convolution examples (examples/primitives/convolution.cpp).
//
// Threading: the batch is split into `threads` chunks, each run by single-threaded oneDNN primitives on
// the calling thread and on this library's own worker threads (the weight gradient sums the chunks').
// oneDNN's OpenMP parallelism is not used: OpenMP worker threads spin after each parallel region and
// steal the cores from XLA's next operations, and the OpenMP runtime may be shared with another
// library in the process (PyTorch loads a libgomp.so.1 too), whose thread settings would leak into
// ours and ours into it. The calling thread's OpenMP thread count is restored after each call.
#include <omp.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  std::string Key(int mode) const {
    std::string key = std::to_string(mode);
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}) key += "," + std::to_string(v);
    return key;
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, dt::f32, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc); }
  memory::desc UserWeights() const { return memory::desc({o, c, kh, kw}, dt::f32, tag::hwio); }
  memory::desc AnyWeights() const { return memory::desc({o, c, kh, kw}, dt::f32, tag::any); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

// One cached entry (per mode and shape): the convolution primitive, its weights layout, the reorder
// between that layout and HWIO, and the scratchpad size it needs.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;
  bool reorder = false;
  dnnl::reorder weights_reorder;
  memory::desc scratchpad;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Plan>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Plan>>();
  return *cache;
}

// Built on a thread whose OpenMP thread count is 1, so oneDNN plans single-threaded kernels.
std::shared_ptr<Plan> GetPlan(const Geometry& g, int mode) {
  const std::string key = g.Key(mode);
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = Cache().find(key);
  if (it != Cache().end()) return it->second;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-chunk scratchpads: chunks run concurrently
  auto fwd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(),
      g.Dst(), g.Strides(), g.PadL(), g.PadR(), attr);
  auto plan = std::make_shared<Plan>();
  if (mode == 0) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (mode == 1) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), g.Strides(), g.PadL(),
        g.PadR(), fwd, attr);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), g.Strides(), g.PadL(),
        g.PadR(), fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  }
  plan->reorder = plan->weights != g.UserWeights();
  if (plan->reorder) {
    auto from = mode == 2 ? plan->weights : g.UserWeights();
    auto to = mode == 2 ? g.UserWeights() : plan->weights;
    plan->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  Cache().emplace(key, plan);
  return plan;
}

Geometry FromShapes(ffi::Span<const int64_t> act, ffi::Span<const int64_t> out, ffi::Span<const int64_t> kernel,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  // act: the input image x [N,H,W,C]; out: the output image y [N,OH,OW,O]; kernel [KH,KW,C,O].
  return Geometry{act[0], act[1], act[2], act[3], kernel[0], kernel[1], kernel[3], out[1], out[2],
                  sh, sw, pt, pb, pl, pr};
}

// Runs the convolution in `mode` (0 forward, 1 input gradient, 2 weight gradient) on batch chunks.
// `src`/`dst` are the NHWC images (x or dx, y or dy), `user_weights` the HWIO kernel (input for modes
// 0 and 1, output for mode 2).
ffi::Error Run(const Geometry& g, int mode, float* src, float* dst, float* user_weights, int64_t threads) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, g.n));
  const int64_t weights_size = g.kh * g.kw * g.c * g.o;
  std::vector<std::vector<float>> partial(mode == 2 ? chunks - 1 : 0, std::vector<float>(weights_size));
  std::vector<std::string> errors(chunks);
  const int previous = omp_get_max_threads();
  omp_set_num_threads(1);
  std::function<void(int)> chunk_fn = [&](int i) {
    try {
      const int64_t begin = g.n * i / chunks, end = g.n * (i + 1) / chunks;
      Geometry part = g;
      part.n = end - begin;
      auto plan = GetPlan(part, mode);
      dnnl::stream stream(Engine());
      float* own_weights = (mode == 2 && i > 0) ? partial[i - 1].data() : user_weights;
      memory user(part.UserWeights(), Engine(), own_weights);
      memory weights = plan->reorder ? memory(plan->weights, Engine()) : user;
      if (plan->reorder && mode != 2) plan->weights_reorder.execute(stream, user, weights);
      memory scratch(plan->scratchpad, Engine());
      memory s(part.Src(), Engine(), src + begin * g.h * g.w * g.c);
      memory d(part.Dst(), Engine(), dst + begin * g.oh * g.ow * g.o);
      std::unordered_map<int, memory> args = {{DNNL_ARG_SCRATCHPAD, scratch}};
      if (mode == 0) {
        args.insert({{DNNL_ARG_SRC, s}, {DNNL_ARG_DST, d}, {DNNL_ARG_WEIGHTS, weights}});
      } else if (mode == 1) {
        args.insert({{DNNL_ARG_DIFF_SRC, s}, {DNNL_ARG_DIFF_DST, d}, {DNNL_ARG_WEIGHTS, weights}});
      } else {
        args.insert({{DNNL_ARG_SRC, s}, {DNNL_ARG_DIFF_DST, d}, {DNNL_ARG_DIFF_WEIGHTS, weights}});
      }
      plan->conv.execute(stream, args);
      if (plan->reorder && mode == 2) plan->weights_reorder.execute(stream, weights, user);
      stream.wait();
    } catch (const dnnl::error& e) {
      errors[i] = std::string("oneDNN: ") + e.what();
    } catch (const std::exception& e) {
      errors[i] = e.what();
    }
  };
  diffjax::Pool().Run(static_cast<int>(chunks), chunk_fn);
  omp_set_num_threads(previous);
  for (const auto& e : errors) {
    if (!e.empty()) return ffi::Error::Internal(e);
  }
  for (const auto& p : partial) {
    for (int64_t k = 0; k < weights_size; ++k) user_weights[k] += p[k];
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t threads) {
  Geometry g = FromShapes(x.dimensions(), y->dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(g, 0, x.typed_data(), y->typed_data(), w.typed_data(), threads);
}

ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                            int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t threads) {
  Geometry g = FromShapes(dx->dimensions(), dy.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(g, 1, dx->typed_data(), dy.typed_data(), w.typed_data(), threads);
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                               int64_t threads) {
  Geometry g = FromShapes(x.dimensions(), dy.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(g, 2, x.typed_data(), dy.typed_data(), dw->typed_data(), threads);
}

}  // namespace

#define DIFFJAX_CONV_BINDING                                                                   \
  ffi::Ffi::Bind()                                                                             \
      .Arg<ffi::Buffer<ffi::F32>>()                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                                            \
      .Ret<ffi::Buffer<ffi::F32>>()                                                            \
      .Attr<int64_t>("sh")                                                                     \
      .Attr<int64_t>("sw")                                                                     \
      .Attr<int64_t>("pt")                                                                     \
      .Attr<int64_t>("pb")                                                                     \
      .Attr<int64_t>("pl")                                                                     \
      .Attr<int64_t>("pr")                                                                     \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxOnednnConvFwd, ConvForward, DIFFJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxOnednnConvBwdData, ConvBackwardData, DIFFJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffjaxOnednnConvBwdWeights, ConvBackwardWeights, DIFFJAX_CONV_BINDING);
