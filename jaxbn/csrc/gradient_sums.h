// jaxbn_grad_sums: sum dy and sum dy (x - mean) in one read of dy and x.
#ifndef JAXBN_CSRC_GRADIENT_SUMS_H_
#define JAXBN_CSRC_GRADIENT_SUMS_H_

#include "common.h"

namespace {


// ----------------------------------------------------- gradient reductions

// A fused ReLU after the normalization: the output was max(z, 0) with z =
// (x - mean) a + b, so dy reaches z only where z > 0 (0 at z = 0 and for a
// NaN z, as XLA's select). z is recomputed from x with the forward's float32
// a and b, each step rounded once (no FMA contraction: see setup.py): the
// forward's own decision where its output pass was the kernel's (wide rows).
// XLA:CPU's pass fuses the last multiply-add into one FMA where the CPU has
// it, so there the two may disagree for a z within an ulp of 0 (an output
// that is 0 to rounding, whose dy then passes or not).
struct ReluGate {
  const float* a;  // per problem and channel; nullptr: no activation
  const float* b;
  bool on() const { return a != nullptr; }
  // The same gate from element `offset` of a and b on.
  ReluGate At(int64_t offset) const { return on() ? ReluGate{a + offset, b + offset} : *this; }
};

// Calls f(std::true_type) for a gate that is on, else f(std::false_type): the
// loops are compiled with and without the gate.
template <class F>
[[gnu::always_inline]] inline void WithGate(bool on, const F& f) {
  if (on) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

inline Vec Gated(Vec dy, Vec centered, Vec a, Vec b) {
  return centered * a + b > Vec{} ? dy : Vec{};
}
inline float Gated(float dy, float centered, float a, float b) {
  return centered * a + b > 0.f ? dy : 0.f;
}

// sum dy and sum dy * (x - mean) over rows of a (rows, C) block, added to
// the part's double accumulators; `scratch` holds 2 C floats.
// With kGate, dy is first gated by the fused ReLU (`gate`: a and b of C
// floats).
template <bool kGate, class In>
[[gnu::always_inline]] inline void RowBlockGradSums(const In* __restrict dy, const In* __restrict x,
                                const float* __restrict mean, ReluGate gate, int64_t rows,
                                int64_t channels, float* __restrict scratch,
                                double* __restrict sum_dy, double* __restrict sum_dy_xc) {
  float* __restrict s = scratch;
  float* __restrict q = scratch + channels;
  std::fill(scratch, scratch + 2 * channels, 0.f);
  const int64_t C = channels;
  ForEachRowStep(rows, C <= 32 || C >= WideRowChannels() ? 4 : C <= 64 ? 2 : 1, [&](int64_t i, auto step) JAXBN_INLINE {
    ForEachLanes(C, [&](auto t, int64_t c) JAXBN_INLINE {
      const auto* g_row = dy + i * C + c;
      const auto* x_row = x + i * C + c;
      const auto m = LoadLanes(mean + c, t);
      std::remove_const_t<decltype(m)> ga{}, gb{};
      if constexpr (kGate) {
        ga = LoadLanes(gate.a + c, t);
        gb = LoadLanes(gate.b + c, t);
      }
      const auto load = [&](int k, auto& g, auto& xc) JAXBN_INLINE {
        g = LoadLanes(g_row + k * C, t);
        xc = LoadLanes(x_row + k * C, t) - m;
        if constexpr (kGate) g = Gated(g, xc, ga, gb);
      };
      auto g = m, xc = m;
      load(0, g, xc);
      auto sum = g, sum_xc = g * xc;
#pragma GCC unroll 4
      for (int k = 1; k < decltype(step)::value; ++k) {
        load(k, g, xc);
        sum += g;
        sum_xc += g * xc;
      }
      StoreLanes(s + c, LoadLanes(s + c, t) + sum);
      StoreLanes(q + c, LoadLanes(q + c, t) + sum_xc);
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    sum_dy[c] += s[c];
    sum_dy_xc[c] += q[c];
  }
}

// One channel's run; with kGate, dy gated by the fused ReLU (`gate` at this
// channel).
template <bool kGate, class In>
[[gnu::always_inline]] inline void RunGradSums(const In* __restrict dy, const In* __restrict x,
                                               float mean, ReluGate gate, int64_t n,
                                               float& sum_dy, float& sum_dy_xc) {
  Vec s0 = {}, s1 = {}, q0 = {}, q1 = {};
  float a = 0.f, b = 0.f;
  if constexpr (kGate) {
    a = *gate.a;
    b = *gate.b;
  }
  const Vec m = mean - Vec{}, av = a - Vec{}, bv = b - Vec{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vec g0 = Load(dy + i), g1 = Load(dy + i + kVec);
    const Vec xc0 = Load(x + i) - m, xc1 = Load(x + i + kVec) - m;
    if constexpr (kGate) {
      g0 = Gated(g0, xc0, av, bv);
      g1 = Gated(g1, xc1, av, bv);
    }
    s0 += g0;
    s1 += g1;
    q0 += g0 * xc0;
    q1 += g1 * xc1;
  }
  float st = Sum(s0 + s1), qt = Sum(q0 + q1);
  for (; i < n; ++i) {
    const float xc = ToFloat(x[i]) - mean;
    float g = ToFloat(dy[i]);
    if constexpr (kGate) g = Gated(g, xc, a, b);
    st += g;
    qt += g * xc;
  }
  sum_dy = st;
  sum_dy_xc = qt;
}

JAXBN_HOT void GradSumsBlock(const float* dy, const float* x, const float* mean, ReluGate gate,
                             int64_t rows, int64_t channels, float* scratch,
                             double* sum_dy, double* sum_dy_xc) {
  WithGate(gate.on(), [&](auto gated) JAXBN_INLINE {
    RowBlockGradSums<decltype(gated)::value>(dy, x, mean, gate, rows, channels, scratch, sum_dy,
                                             sum_dy_xc);
  });
}
JAXBN_HOT void GradSumsBlock(const BF16* dy, const BF16* x, const float* mean, ReluGate gate,
                             int64_t rows, int64_t channels, float* scratch,
                             double* sum_dy, double* sum_dy_xc) {
  WithGate(gate.on(), [&](auto gated) JAXBN_INLINE {
    RowBlockGradSums<decltype(gated)::value>(dy, x, mean, gate, rows, channels, scratch, sum_dy,
                                             sum_dy_xc);
  });
}
JAXBN_HOT void GradSumsRun(const float* dy, const float* x, float mean, ReluGate gate,
                           int64_t n, float& sum_dy, float& sum_dy_xc) {
  WithGate(gate.on(), [&](auto gated) JAXBN_INLINE {
    RunGradSums<decltype(gated)::value>(dy, x, mean, gate, n, sum_dy, sum_dy_xc);
  });
}
JAXBN_HOT void GradSumsRun(const BF16* dy, const BF16* x, float mean, ReluGate gate,
                           int64_t n, float& sum_dy, float& sum_dy_xc) {
  WithGate(gate.on(), [&](auto gated) JAXBN_INLINE {
    RunGradSums<decltype(gated)::value>(dy, x, mean, gate, n, sum_dy, sum_dy_xc);
  });
}

// `w`: nullptr, or one weight per (A1, G, A) row of x; rows of weight 0 are
// padding, left out whatever they hold. `gate`: the fused ReLU's a and b
// per problem and channel (nullptr: none).
template <class In>
void ComputeGradSums(ffi::ThreadPool& pool, const View& v, const In* dy, const In* x,
                     const float* mean, const float* w, ReluGate gate, float* sum_dy,
                     float* sum_dy_xc) {
  const Plan plan = PlanFor(v);
  const int64_t tasks = v.problems * plan.parts;
  std::vector<double> acc_dy(tasks * v.c, 0.0), acc_dy_xc(tasks * v.c, 0.0);
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t problem = (task / plan.parts) * v.c;
    const float* problem_mean = mean + problem;
    const ReluGate problem_gate = gate.At(problem);
    double* s = acc_dy.data() + task * v.c;
    double* q = acc_dy_xc.data() + task * v.c;
    std::vector<float> scratch(2 * v.c);
    ForEachBlock(
        v, plan, task,
        [&](int64_t offset, int64_t rows) {
          if (w == nullptr) {
            GradSumsBlock(dy + offset, x + offset, problem_mean, problem_gate, rows, v.c,
                          scratch.data(), s, q);
            return;
          }
          const float* wb = w + offset / v.c;
          for (int64_t i = 0; i < rows;) {  // each run of rows of nonzero weight
            while (i < rows && wb[i] == 0.f) ++i;
            int64_t end = i;
            while (end < rows && wb[end] != 0.f) ++end;
            if (end > i) {
              GradSumsBlock(dy + offset + i * v.c, x + offset + i * v.c, problem_mean,
                            problem_gate, end - i, v.c, scratch.data(), s, q);
            }
            i = end;
          }
        },
        [&](int64_t offset, int64_t c, int64_t n) {
          if (w != nullptr && w[offset / (v.c * v.b)] == 0.f) return;
          float block_dy, block_dy_xc;
          GradSumsRun(dy + offset, x + offset, problem_mean[c], problem_gate.At(c), n,
                      block_dy, block_dy_xc);
          s[c] += block_dy;
          q[c] += block_dy_xc;
        });
  });
  // Parts are added in order (the sums do not depend on the threads), each
  // part's accumulators read front to back: reading them channel by channel,
  // one part after another, strides across all of them (a cache miss per
  // read once they outgrow the cache).
  std::vector<double> total_dy(v.c), total_dy_xc(v.c);
  for (int64_t o = 0; o < v.problems; ++o) {
    std::fill(total_dy.begin(), total_dy.end(), 0.0);
    std::fill(total_dy_xc.begin(), total_dy_xc.end(), 0.0);
    for (int64_t p = 0; p < plan.parts; ++p) {
      const double* part_dy = acc_dy.data() + (o * plan.parts + p) * v.c;
      const double* part_dy_xc = acc_dy_xc.data() + (o * plan.parts + p) * v.c;
      for (int64_t c = 0; c < v.c; ++c) {
        total_dy[c] += part_dy[c];
        total_dy_xc[c] += part_dy_xc[c];
      }
    }
    for (int64_t c = 0; c < v.c; ++c) {
      sum_dy[o * v.c + c] = static_cast<float>(total_dy[c]);
      sum_dy_xc[o * v.c + c] = static_cast<float>(total_dy_xc[c]);
    }
  }
}

ffi::Error GradSumsKernel(ffi::ThreadPool pool, ffi::AnyBuffer dy_buf,
                          ffi::AnyBuffer x_buf, ffi::AnyBuffer mean_buf,
                          ffi::Result<ffi::AnyBuffer> sum_dy_buf,
                          ffi::Result<ffi::AnyBuffer> sum_dy_xc_buf, int64_t rank,
                          int64_t a1, int64_t g, int64_t a, int64_t c, int64_t b) {
  const std::optional<View> view = ViewOf(x_buf.dimensions(), rank, a1, g, a, c, b);
  if (dy_buf.element_type() != x_buf.element_type() ||
      dy_buf.element_count() != x_buf.element_count() ||
      mean_buf.element_type() != ffi::F32 || !view ||
      mean_buf.element_count() != view->problems * c) {
    return ffi::Error::InvalidArgument(
        "jaxbn_grad_sums expects dy and x of one dtype and shape matching "
        "(a1, g, a, c, b), and a float32 mean of c values per problem");
  }
  const View& v = *view;
  const float* mean = mean_buf.typed_data<float>();
  float* sum_dy = sum_dy_buf->typed_data<float>();
  float* sum_dy_xc = sum_dy_xc_buf->typed_data<float>();
  return WithFloatType(x_buf, "jaxbn_grad_sums expects float32 or bfloat16 dy and x",
                       [&](auto* type) {
                         using T = std::remove_pointer_t<decltype(type)>;
                         ComputeGradSums(pool, v, Data<T>(dy_buf), Data<T>(x_buf), mean,
                                         nullptr, {}, sum_dy, sum_dy_xc);
                       });
}


}  // namespace

#endif  // JAXBN_CSRC_GRADIENT_SUMS_H_
