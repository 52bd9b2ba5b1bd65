// jaxbn_input_grad: the backward's last pass, dx from per-channel coefficients.
#ifndef JAXBN_CSRC_INPUT_GRADIENT_H_
#define JAXBN_CSRC_INPUT_GRADIENT_H_

#include "common.h"

namespace {

// dx = a * dy + c * (x - m) + d with per-channel a, c, d and the mean m:
// the last pass of the backward. Centred on the mean, as the forward: c x + d'
// with d' = d - c m would cancel where |mean| >> std. With `stream` (the
// caller sets it for outputs larger than a quarter of the last-level cache)
// results go out with streaming stores, which bypass the cache: a plain store
// first reads the line it overwrites from memory, a streaming store does not.

// Calls f(std::true_type) to stream to `dx` (asked for, and aligned), else
// f(std::false_type).
template <class F>
[[gnu::always_inline]] inline void WithStores(bool stream, const void* dx, const F& f) {
  if (stream && StreamAligned(dx)) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The same for a block of rows of `channels` elements from `out` on: all of
// them streamed (every row aligned as the first) or none, decided once.
template <class Out, class F>
[[gnu::always_inline]] inline void WithRowStores(bool stream, const Out* out, int64_t channels,
                                                 const F& f) {
  WithStores(stream && (channels * sizeof(Out)) % 16 == 0, out, f);
}

// The fused ReLU's gate for the input gradient: its a and b, and the mean
// it centres x with (`relu.a` nullptr: no activation).
struct InputGate {
  const float* mean;
  ReluGate relu;
  InputGate At(int64_t offset) const {
    return relu.on() ? InputGate{mean + offset, relu.At(offset)} : *this;
  }
};

// dx of R rows of `channels` elements each (the coefficients loaded once
// for all R).
template <bool kStream, bool kGate, int R, class In>
[[gnu::always_inline]] inline void RowStepInputGrad(const In* __restrict dy,
                                                    const In* __restrict x,
                                                    const float* __restrict a,
                                                    const float* __restrict c,
                                                    const float* __restrict d,
                                                    const float* __restrict mean,
                                                    InputGate gate, int64_t channels,
                                                    In* __restrict dx) {
  ForEachLanes(channels, [&](auto t, int64_t ch) JAXBN_INLINE {
    const auto av = LoadLanes(a + ch, t), cv = LoadLanes(c + ch, t), dv = LoadLanes(d + ch, t);
    const auto m = LoadLanes(mean + ch, t);
    std::remove_const_t<decltype(av)> gm{}, ga{}, gb{};
    if constexpr (kGate) {
      gm = LoadLanes(gate.mean + ch, t);
      ga = LoadLanes(gate.relu.a + ch, t);
      gb = LoadLanes(gate.relu.b + ch, t);
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
      const int64_t o = k * channels + ch;
      auto g = LoadLanes(dy + o, t);
      const auto xv = LoadLanes(x + o, t);
      if constexpr (kGate) g = Gated(g, xv - gm, ga, gb);
      PutLanes<kStream>(dx + o, av * g + (cv * (xv - m) + dv));
    }
  });
}

// dx = 0 for padding (a row or run of weight 0): neither dy nor x is read,
// so whatever the padding holds stays out. The all-zero bit pattern is 0 in
// float32 and bfloat16 alike.
template <class In>
inline void ZeroGrad(int64_t n, In* dx) {
  std::memset(static_cast<void*>(dx), 0, n * sizeof(In));
}

// `gate`: the fused ReLU's mean, a and b of this run's channel.
template <bool kStream, bool kGate, class In>
[[gnu::always_inline]] inline void RunInputGrad(const In* __restrict dy, const In* __restrict x,
                                                float a, float c, float d, float m,
                                                InputGate gate, int64_t n,
                                                In* __restrict dx) {
  const Vec av = a - Vec{}, cv = c - Vec{}, dv = d - Vec{}, mv = m - Vec{};
  float gm = 0.f, ga = 0.f, gb = 0.f;
  if constexpr (kGate) {
    gm = *gate.mean;
    ga = *gate.relu.a;
    gb = *gate.relu.b;
  }
  const Vec gmv = gm - Vec{}, gav = ga - Vec{}, gbv = gb - Vec{};
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    Vec g = Load(dy + i);
    const Vec xv = Load(x + i);
    if constexpr (kGate) g = Gated(g, xv - gmv, gav, gbv);
    PutLanes<kStream>(dx + i, av * g + (cv * (xv - mv) + dv));
  }
  for (; i < n; ++i) {
    float g = ToFloat(dy[i]);
    const float xv = ToFloat(x[i]);
    if constexpr (kGate) g = Gated(g, xv - gm, ga, gb);
    StoreLanes(dx + i, a * g + (c * (xv - m) + d));
  }
}

template <class In>
[[gnu::always_inline]] inline void RowBlockInputGrad(const In* dy, const In* x, const float* a,
                                                     const float* c, const float* d,
                                                     const float* m, InputGate gate,
                                                     int64_t rows,
                                                     int64_t channels, bool stream, In* dx) {
  WithGate(gate.relu.on(), [&](auto gated) JAXBN_INLINE {
    if (channels < WideRowChannels()) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t o = i * channels;
        WithStores(stream, dx + o, [&](auto kind) JAXBN_INLINE {
          RowStepInputGrad<decltype(kind)::value, decltype(gated)::value, 1>(
              dy + o, x + o, a, c, d, m, gate, channels, dx + o);
        });
      }
      return;
    }
    // From WideRowChannels() channels on, four rows at a time: the
    // coefficients (4 floats a channel: 57 KB for 3584 channels) no longer
    // stay in L1 beside the rows streaming through it, and each is loaded
    // once for four rows instead of once a row.
    WithRowStores(stream, dx, channels, [&](auto kind) JAXBN_INLINE {
      ForEachRowStep<4>(rows, [&](int64_t i, auto step) JAXBN_INLINE {
        const int64_t o = i * channels;
        RowStepInputGrad<decltype(kind)::value, decltype(gated)::value,
                         decltype(step)::value>(dy + o, x + o, a, c, d, m, gate,
                                                channels, dx + o);
      });
    });
  });
}

// Rows with weights `w` get dx = a dy + w (c (x - m) + d), a row of weight 0 zeros;
// `scratch` holds 2 C floats for a fractional weight's
// coefficients. Kept apart from the unweighted loop, whose code it would
// slow down fivefold.
template <class In>
[[gnu::always_inline]] inline void WeightedRowBlockInputGrad(
    const In* dy, const In* x, const float* a, const float* c, const float* d, const float* m,
    const float* w, InputGate gate, int64_t rows, int64_t channels, bool stream,
    float* scratch, In* dx) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * channels;
    const float wi = w[i];
    const float* ci = c;
    const float* di = d;
    if (wi == 0.f) {
      ZeroGrad(channels, dx + o);
      continue;
    }
    if (wi != 1.f) {
      for (int64_t ch = 0; ch < channels; ++ch) {
        scratch[ch] = wi * c[ch];
        scratch[channels + ch] = wi * d[ch];
      }
      ci = scratch;
      di = scratch + channels;
    }
    WithGate(gate.relu.on(), [&](auto gated) JAXBN_INLINE {
      WithStores(stream, dx + o, [&](auto kind) JAXBN_INLINE {
        RowStepInputGrad<decltype(kind)::value, decltype(gated)::value, 1>(
            dy + o, x + o, a, ci, di, m, gate, channels, dx + o);
      });
    });
  }
}

template <class In>
[[gnu::always_inline]] inline void RunBlockInputGrad(const In* dy, const In* x, float a,
                                                     float c, float d, float m,
                                                     InputGate gate, int64_t n, bool stream,
                                                     In* dx) {
  WithGate(gate.relu.on(), [&](auto gated) JAXBN_INLINE {
    WithStores(stream, dx, [&](auto kind) JAXBN_INLINE {
      RunInputGrad<decltype(kind)::value, decltype(gated)::value>(dy, x, a, c, d, m, gate, n,
                                                                  dx);
    });
  });
}

// A run of one row, of weight w: dx = a dy + w (c (x - m) + d); zeros for w = 0.
template <class In>
[[gnu::always_inline]] inline void WeightedRunInputGrad(const In* dy, const In* x, float a,
                                                        float c, float d, float m, float w,
                                                        InputGate gate, int64_t n,
                                                        bool stream, In* dx) {
  if (w == 1.f) {
    RunBlockInputGrad(dy, x, a, c, d, m, gate, n, stream, dx);
  } else if (w == 0.f) {
    ZeroGrad(n, dx);
  } else {
    RunBlockInputGrad(dy, x, a, w * c, w * d, m, gate, n, stream, dx);
  }
}

JAXBN_HOT void InputGradBlock(const float* dy, const float* x, const float* a, const float* c,
                              const float* d, const float* m, InputGate gate, int64_t rows,
                              int64_t channels, bool stream, float* dx) {
  RowBlockInputGrad(dy, x, a, c, d, m, gate, rows, channels, stream, dx);
}
JAXBN_HOT void InputGradBlock(const BF16* dy, const BF16* x, const float* a, const float* c,
                              const float* d, const float* m, InputGate gate, int64_t rows,
                              int64_t channels, bool stream, BF16* dx) {
  RowBlockInputGrad(dy, x, a, c, d, m, gate, rows, channels, stream, dx);
}
JAXBN_HOT void WeightedInputGradBlock(const float* dy, const float* x, const float* a,
                                      const float* c, const float* d, const float* m,
                                      const float* w, InputGate gate, int64_t rows,
                                      int64_t channels, bool stream, float* scratch,
                                      float* dx) {
  WeightedRowBlockInputGrad(dy, x, a, c, d, m, w, gate, rows, channels, stream, scratch, dx);
}
JAXBN_HOT void WeightedInputGradBlock(const BF16* dy, const BF16* x, const float* a,
                                      const float* c, const float* d, const float* m,
                                      const float* w, InputGate gate, int64_t rows,
                                      int64_t channels, bool stream, float* scratch,
                                      BF16* dx) {
  WeightedRowBlockInputGrad(dy, x, a, c, d, m, w, gate, rows, channels, stream, scratch, dx);
}
JAXBN_HOT void InputGradRun(const float* dy, const float* x, float a, float c, float d,
                            float m, float w, InputGate gate, int64_t n, bool stream,
                            float* dx) {
  WeightedRunInputGrad(dy, x, a, c, d, m, w, gate, n, stream, dx);
}
JAXBN_HOT void InputGradRun(const BF16* dy, const BF16* x, float a, float c, float d, float m,
                            float w, InputGate gate, int64_t n, bool stream, BF16* dx) {
  WeightedRunInputGrad(dy, x, a, c, d, m, w, gate, n, stream, dx);
}

// `coefficients` holds a, c, d and the mean m (C values each) per problem.
// `w`: nullptr, or one weight per (A1, G, A) row of x. `gate`: the fused
// ReLU's mean, a and b per problem and channel (relu.a nullptr: none).
template <class In>
void ComputeInputGrad(ffi::ThreadPool& pool, const View& v, const In* dy, const In* x,
                      const float* coefficients, const float* w, InputGate gate, bool stream,
                      In* dx) {
  const Plan plan = PlanFor(v);
  ParallelFor(pool, v.problems * plan.parts, [&](int64_t task) {
    const InputGate problem_gate = gate.At((task / plan.parts) * v.c);
    const float* a = coefficients + (task / plan.parts) * 4 * v.c;
    const float* c = a + v.c;
    const float* d = c + v.c;
    const float* m = d + v.c;
    std::vector<float> scratch(w == nullptr ? 0 : 2 * v.c);
    ForEachBlock(
        v, plan, task,
        [&](int64_t offset, int64_t rows) {
          if (w == nullptr) {
            InputGradBlock(dy + offset, x + offset, a, c, d, m, problem_gate, rows, v.c,
                           stream, dx + offset);
          } else {
            WeightedInputGradBlock(dy + offset, x + offset, a, c, d, m, w + offset / v.c,
                                   problem_gate, rows, v.c, stream, scratch.data(),
                                   dx + offset);
          }
        },
        [&](int64_t offset, int64_t ch, int64_t n) {
          const float weight = w == nullptr ? 1.f : w[offset / (v.c * v.b)];
          InputGradRun(dy + offset, x + offset, a[ch], c[ch], d[ch], m[ch], weight,
                       problem_gate.At(ch), n, stream, dx + offset);
        });
#if defined(__SSE2__)
    // Streaming stores are weakly ordered: each thread fences its own before
    // it reports the part done.
    if (stream) _mm_sfence();
#endif
  });
}

ffi::Error InputGradKernel(ffi::ThreadPool pool, ffi::AnyBuffer dy_buf, ffi::AnyBuffer x_buf,
                           ffi::AnyBuffer coefficients_buf, ffi::AnyBuffer w_buf,
                           ffi::Result<ffi::AnyBuffer> dx_buf,
                           int64_t rank, int64_t a1, int64_t g, int64_t a, int64_t c, int64_t b,
                           bool stream, bool masked) {
  const std::optional<View> view = ViewOf(x_buf.dimensions(), rank, a1, g, a, c, b);
  const std::optional<const float*> weights =
      view ? RowWeights(w_buf, masked, *view, x_buf.element_count()) : std::nullopt;
  if (!weights || dy_buf.element_type() != x_buf.element_type() ||
      dx_buf->element_type() != x_buf.element_type() ||
      dy_buf.element_count() != x_buf.element_count() ||
      dx_buf->element_count() != x_buf.element_count() ||
      coefficients_buf.element_type() != ffi::F32 || !view ||
      coefficients_buf.element_count() != view->problems * 4 * c) {
    return ffi::Error::InvalidArgument(
        "jaxbn_input_grad expects dy, x and dx of one dtype and shape matching "
        "(a1, g, a, c, b), and float32 coefficients (4, c) per problem");
  }
  const View& v = *view;
  const float* coefficients = coefficients_buf.typed_data<float>();
  return WithFloatType(x_buf, "jaxbn_input_grad expects float32 or bfloat16 dy and x",
                       [&](auto* type) {
                         using T = std::remove_pointer_t<decltype(type)>;
                         ComputeInputGrad(pool, v, Data<T>(dy_buf), Data<T>(x_buf),
                                          coefficients, *weights, {}, stream,
                                          Data<T>(*dx_buf));
                       });
}


}  // namespace

#endif  // JAXBN_CSRC_INPUT_GRADIENT_H_
