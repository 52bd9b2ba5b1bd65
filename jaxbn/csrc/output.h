// jaxbn_normalize: the forward's output pass (wide rows).
#ifndef JAXBN_CSRC_OUTPUT_H_
#define JAXBN_CSRC_OUTPUT_H_

#include "common.h"

namespace {

// ------------------------------------------------------------ output pass

// y = (x u - m) a + b per channel, then max(y, 0) with a fused ReLU: the
// forward's output pass (affine.normalize) in its order of operations, each
// step rounded once (no FMA contraction: see setup.py; XLA:CPU may fuse the
// last multiply-add, an ulp apart), z as the backward's ReLU gate computes
// it; the ReLU keeps a NaN and turns -0 into 0, as XLA's maximum. `u` is
// 1 / unit (1 for an ordinary channel) and `m` the mean in those units.
// jaxbn calls it for wide rows only: there XLA's fused pass reads, for every
// element, each per-channel vector y's coefficients derive from (seven of
// 14 KB at 3584 channels), where four rows per step here load four once.
struct OutputTerms {
  const float *u, *m, *a, *b;  // C floats each
};

inline Vec Relu(Vec v) { return v <= Vec{} ? Vec{} : v; }
inline float Relu(float v) { return v <= 0.f ? 0.f : v; }

template <bool kStream, bool kRelu, int R, class In>
[[gnu::always_inline]] inline void RowStepOutput(const In* __restrict x, OutputTerms t,
                                                 int64_t channels, In* __restrict y) {
  ForEachLanes(channels, [&](auto lanes, int64_t ch) JAXBN_INLINE {
    const auto u = LoadLanes(t.u + ch, lanes), m = LoadLanes(t.m + ch, lanes);
    const auto a = LoadLanes(t.a + ch, lanes), b = LoadLanes(t.b + ch, lanes);
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
      const int64_t o = k * channels + ch;
      auto v = (LoadLanes(x + o, lanes) * u - m) * a + b;
      if constexpr (kRelu) v = Relu(v);
      PutLanes<kStream>(y + o, v);
    }
  });
}

template <bool kStream, bool kRelu, class In>
[[gnu::always_inline]] inline void RunOutput(const In* __restrict x, float u, float m, float a,
                                             float b, int64_t n, In* __restrict y) {
  const Vec uv = u - Vec{}, mv = m - Vec{}, av = a - Vec{}, bv = b - Vec{};
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    Vec v = (Load(x + i) * uv - mv) * av + bv;
    if constexpr (kRelu) v = Relu(v);
    PutLanes<kStream>(y + i, v);
  }
  for (; i < n; ++i) {
    float v = (ToFloat(x[i]) * u - m) * a + b;
    if constexpr (kRelu) v = Relu(v);
    StoreLanes(y + i, v);
  }
}

template <class In>
[[gnu::always_inline]] inline void RowBlockOutput(const In* x, OutputTerms t, int64_t rows,
                                                  int64_t channels, bool relu, bool stream,
                                                  In* y) {
  WithGate(relu, [&](auto gated) JAXBN_INLINE {
    WithRowStores(stream, y, channels, [&](auto kind) JAXBN_INLINE {
      ForEachRowStep<4>(rows, [&](int64_t i, auto step) JAXBN_INLINE {
        RowStepOutput<decltype(kind)::value, decltype(gated)::value, decltype(step)::value>(
            x + i * channels, t, channels, y + i * channels);
      });
    });
  });
}

template <class In>
[[gnu::always_inline]] inline void RunBlockOutput(const In* x, float u, float m, float a,
                                                  float b, int64_t n, bool relu, bool stream,
                                                  In* y) {
  WithGate(relu, [&](auto gated) JAXBN_INLINE {
    WithStores(stream, y, [&](auto kind) JAXBN_INLINE {
      RunOutput<decltype(kind)::value, decltype(gated)::value>(x, u, m, a, b, n, y);
    });
  });
}

JAXBN_HOT void OutputBlock(const float* x, OutputTerms t, int64_t rows, int64_t channels,
                           bool relu, bool stream, float* y) {
  RowBlockOutput(x, t, rows, channels, relu, stream, y);
}
JAXBN_HOT void OutputBlock(const BF16* x, OutputTerms t, int64_t rows, int64_t channels,
                           bool relu, bool stream, BF16* y) {
  RowBlockOutput(x, t, rows, channels, relu, stream, y);
}
JAXBN_HOT void OutputRun(const float* x, float u, float m, float a, float b, int64_t n,
                         bool relu, bool stream, float* y) {
  RunBlockOutput(x, u, m, a, b, n, relu, stream, y);
}
JAXBN_HOT void OutputRun(const BF16* x, float u, float m, float a, float b, int64_t n,
                         bool relu, bool stream, BF16* y) {
  RunBlockOutput(x, u, m, a, b, n, relu, stream, y);
}

// `terms` holds u, m, a and b (C values each) per problem.
template <class In>
void ComputeOutput(ffi::ThreadPool& pool, const View& v, const In* x, const float* terms,
                   bool relu, bool stream, In* y) {
  const Plan plan = PlanFor(v);
  ParallelFor(pool, v.problems * plan.parts, [&](int64_t task) {
    const float* u = terms + (task / plan.parts) * 4 * v.c;
    const OutputTerms t{u, u + v.c, u + 2 * v.c, u + 3 * v.c};
    ForEachBlock(
        v, plan, task,
        [&](int64_t offset, int64_t rows) {
          OutputBlock(x + offset, t, rows, v.c, relu, stream, y + offset);
        },
        [&](int64_t offset, int64_t ch, int64_t n) {
          OutputRun(x + offset, t.u[ch], t.m[ch], t.a[ch], t.b[ch], n, relu, stream,
                    y + offset);
        });
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // as in ComputeInputGrad
#endif
  });
}

ffi::Error OutputKernel(ffi::ThreadPool pool, ffi::AnyBuffer x_buf, ffi::AnyBuffer terms_buf,
                        ffi::Result<ffi::AnyBuffer> y_buf, int64_t rank, int64_t a1,
                        int64_t g, int64_t a, int64_t c, int64_t b, bool stream, bool relu) {
  const std::optional<View> view = ViewOf(x_buf.dimensions(), rank, a1, g, a, c, b);
  if (!view || y_buf->element_type() != x_buf.element_type() ||
      y_buf->element_count() != x_buf.element_count() ||
      terms_buf.element_type() != ffi::F32 ||
      terms_buf.element_count() != view->problems * 4 * c) {
    return ffi::Error::InvalidArgument(
        "jaxbn_normalize expects x and y of one dtype and shape matching "
        "(a1, g, a, c, b), and float32 terms (4, c) per problem");
  }
  const float* terms = terms_buf.typed_data<float>();
  return WithFloatType(x_buf, "jaxbn_normalize expects float32 or bfloat16 x",
                       [&](auto* type) {
                         using T = std::remove_pointer_t<decltype(type)>;
                         ComputeOutput(pool, *view, Data<T>(x_buf), terms, relu, stream,
                                       Data<T>(*y_buf));
                       });
}


}  // namespace

#endif  // JAXBN_CSRC_OUTPUT_H_
