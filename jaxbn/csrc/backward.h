// jaxbn_backward: the whole backward in one call.
#ifndef JAXBN_CSRC_BACKWARD_H_
#define JAXBN_CSRC_BACKWARD_H_

#include "gradient_sums.h"
#include "input_gradient.h"

namespace {

// ------------------------------------------------------- whole backward

// The backward in one call. Its two passes run back to back, so the second
// finds in cache what the first left there, where XLA would schedule other
// work between two separate calls. Per channel the coefficients a, c, d of
// jaxbn.affine.backward_coefficients (in double) from S1 = sum dy and
// S2 = sum dy (x - mean), then dx = a dy + c (x - mean) + d. With a fused
// ReLU, dy is gated (ReluGate) in both passes. dx == nullptr: the sums
// alone (the call's input gradient unused: jaxbn.cpu_kernels' DCE rule).
//
// With units (jaxbn.stats.in_units: a channel spread beyond 2^30 is
// measured in units, u = 1 / unit a power of two per channel), the
// per-channel operands are those of x u (epsilon becomes epsilon u^2) and
// dx is u times the gradient with respect to x u, as XLA's passes in units
// compute it. Data that need units are rare: where any u is not 1 the
// passes run as plain loops (UnitBackward), the vector loops stay free of
// the extra multiply.
struct ChannelTerms {
  const float* mean;
  const float* variance;
  const float* scale;
  const float* d_mean;
  const float* d_variance;
  const float* count;
  const float* unit;  // 1 / unit per channel; nullptr: no units
};

// f(element offset, problem * C + channel, row) for every element of x.
template <class F>
void ForEachElement(const View& v, const F& f) {
  for (int64_t o = 0; o < v.problems; ++o) {
    for (int64_t i1 = 0; i1 < v.a1; ++i1) {
      const int64_t chunk = v.ChunkOffset(o, i1);
      for (int64_t r = 0; r < v.a; ++r) {
        for (int64_t ch = 0; ch < v.c; ++ch) {
          for (int64_t i = 0; i < v.b; ++i) {
            const int64_t e = chunk + (r * v.c + ch) * v.b + i;
            f(e, o * v.c + ch, e / (v.c * v.b));
          }
        }
      }
    }
  }
}

// The two passes in units (see above), given the coefficients' function.
template <class In, class Coefficients>
void UnitBackward(const View& v, const In* dy, const In* x, const ChannelTerms& t,
                  const float* w, ReluGate relu, const Coefficients& coefficients, In* dx,
                  float* sum_dy, float* sum_dy_xc) {
  const int64_t channels = v.problems * v.c;
  const float* mean = t.mean;
  const float* unit = t.unit;
  const auto centered = [&](int64_t e, int64_t k) { return ToFloat(x[e]) * unit[k] - mean[k]; };
  const auto gated = [&](int64_t e, int64_t k, float xc) {
    const float g = ToFloat(dy[e]);
    return relu.on() ? Gated(g, xc, relu.a[k], relu.b[k]) : g;
  };
  std::vector<double> s1(channels, 0.0), s2(channels, 0.0);
  ForEachElement(v, [&](int64_t e, int64_t k, int64_t row) {
    if (w != nullptr && w[row] == 0.f) return;
    const float xc = centered(e, k);
    const float g = gated(e, k, xc);
    s1[k] += g;
    s2[k] += static_cast<double>(g * xc);
  });
  for (int64_t k = 0; k < channels; ++k) {
    sum_dy[k] = static_cast<float>(s1[k]);
    sum_dy_xc[k] = static_cast<float>(s2[k]);
  }
  if (dx == nullptr) return;  // the sums alone (see ComputeBackward)
  const std::vector<float> acd = coefficients();  // a, c, d per channel
  ForEachElement(v, [&](int64_t e, int64_t k, int64_t row) {
    const float weight = w == nullptr ? 1.f : w[row];
    if (weight == 0.f) {
      StoreLanes(dx + e, 0.f);
      return;
    }
    const float xc = centered(e, k);
    const float g = gated(e, k, xc);
    const float a = acd[k], c = acd[channels + k], d = acd[2 * channels + k];
    StoreLanes(dx + e, unit[k] * (a * g + weight * (c * xc + d)));
  });
}

template <class In>
void ComputeBackward(ffi::ThreadPool& pool, const View& v, const In* dy, const In* x,
                     const ChannelTerms& t, const float* w, ReluGate relu, float epsilon,
                     bool stream, In* dx, float* sum_dy, float* sum_dy_xc) {
  const int64_t channels = v.problems * v.c;
  const float* unit = t.unit;
  const bool units = unit != nullptr &&
                     std::any_of(unit, unit + channels, [](float u) { return u != 1.f; });
  // a, c, d of channel i (of problem i / C) from the sums
  const auto coefficients_of = [&](int64_t i, double& a, double& c, double& d) {
    const double n = t.count[i];
    // epsilon in units: epsilon u^2 (exact in double)
    const double eps = units ? double(epsilon) * unit[i] * unit[i] : double(epsilon);
    // 0 where var + epsilon is 0 (a constant channel with epsilon 0), as
    // affine.inverse_std
    const double var_eps = double(t.variance[i]) + eps;
    const double inv = var_eps == 0.0 ? 0.0 : 1.0 / std::sqrt(var_eps);
    const double gamma = t.scale[i];
    // a as the input gradient's pass will use it (float32): for one element
    // per channel, d = -a S1 then cancels a dy exactly, as in XLA
    a = static_cast<float>(gamma * inv);
    const double dl_dmean = -a * sum_dy[i] + t.d_mean[i];
    const double dl_dvar = -0.5 * gamma * (inv * inv * inv) * sum_dy_xc[i] + t.d_variance[i];
    c = n > 0 ? 2.0 * dl_dvar / n : 0.0;
    d = n > 0 ? dl_dmean / n : 0.0;  // centred on the mean
  };
  if (units) {
    UnitBackward(v, dy, x, t, w, relu, [&] {
      std::vector<float> acd(3 * channels);
      for (int64_t i = 0; i < channels; ++i) {
        double a, c, d;
        coefficients_of(i, a, c, d);
        acd[i] = static_cast<float>(a);
        acd[channels + i] = static_cast<float>(c);
        acd[2 * channels + i] = static_cast<float>(d);
      }
      return acd;
    }, dx, sum_dy, sum_dy_xc);
    return;
  }
  ComputeGradSums(pool, v, dy, x, t.mean, w, relu, sum_dy, sum_dy_xc);
  if (dx == nullptr) return;
  std::vector<float> coefficients(v.problems * 4 * v.c);
  for (int64_t i = 0; i < channels; ++i) {
    double a, c, d;
    coefficients_of(i, a, c, d);
    float* problem = coefficients.data() + (i / v.c) * 4 * v.c + i % v.c;
    problem[0] = static_cast<float>(a);
    problem[v.c] = static_cast<float>(c);
    problem[2 * v.c] = static_cast<float>(d);
    problem[3 * v.c] = t.mean[i];
  }
  ComputeInputGrad(pool, v, dy, x, coefficients.data(), w, InputGate{t.mean, relu}, stream,
                   dx);
}

ffi::Error BackwardKernel(ffi::ThreadPool pool, ffi::AnyBuffer dy_buf, ffi::AnyBuffer x_buf,
                          ffi::AnyBuffer mean_buf, ffi::AnyBuffer variance_buf,
                          ffi::AnyBuffer scale_buf, ffi::AnyBuffer d_mean_buf,
                          ffi::AnyBuffer d_variance_buf, ffi::AnyBuffer count_buf,
                          ffi::AnyBuffer unit_buf, ffi::AnyBuffer w_buf,
                          ffi::AnyBuffer relu_a_buf,
                          ffi::AnyBuffer relu_b_buf, ffi::Result<ffi::AnyBuffer> dx_buf,
                          ffi::Result<ffi::AnyBuffer> sum_dy_buf,
                          ffi::Result<ffi::AnyBuffer> sum_dy_xc_buf, int64_t rank, int64_t a1,
                          int64_t g, int64_t a, int64_t c, int64_t b, bool stream,
                          float epsilon, bool masked, bool relu, bool units,
                          bool input_grad) {
  const std::optional<View> view = ViewOf(x_buf.dimensions(), rank, a1, g, a, c, b);
  const std::optional<const float*> weights =
      view ? RowWeights(w_buf, masked, *view, x_buf.element_count()) : std::nullopt;
  bool valid = view.has_value() && weights.has_value() &&
               dy_buf.element_type() == x_buf.element_type() &&
               dy_buf.element_count() == x_buf.element_count() &&
               (!input_grad || (dx_buf->element_type() == x_buf.element_type() &&
                                dx_buf->element_count() == x_buf.element_count()));
  for (const ffi::AnyBuffer* channel : {&mean_buf, &variance_buf, &scale_buf, &d_mean_buf,
                                        &d_variance_buf, &count_buf, &unit_buf, &relu_a_buf,
                                        &relu_b_buf}) {
    // without a fused ReLU its a and b are one-element placeholders, and
    // without units the unit
    const bool placeholder = (!relu && (channel == &relu_a_buf || channel == &relu_b_buf)) ||
                             (!units && channel == &unit_buf);
    valid = valid && channel->element_type() == ffi::F32 &&
            (placeholder || channel->element_count() == view->problems * c);
  }
  for (ffi::Result<ffi::AnyBuffer>* sum : {&sum_dy_buf, &sum_dy_xc_buf}) {
    valid = valid && (*sum)->element_type() == ffi::F32 &&
            (*sum)->element_count() == view->problems * c;
  }
  if (!valid) {
    return ffi::Error::InvalidArgument(
        "jaxbn_backward expects dy, x and dx of one dtype and shape matching "
        "(a1, g, a, c, b), and float32 per-channel operands (the ReLU's with relu, the "
        "unit with units) and "
        "sums of c values per problem");
  }
  const View& v = *view;
  const ChannelTerms terms{mean_buf.typed_data<float>(),
                           variance_buf.typed_data<float>(),
                           scale_buf.typed_data<float>(),
                           d_mean_buf.typed_data<float>(),
                           d_variance_buf.typed_data<float>(),
                           count_buf.typed_data<float>(),
                           units ? unit_buf.typed_data<float>() : nullptr};
  const ReluGate gate = relu ? ReluGate{relu_a_buf.typed_data<float>(),
                                        relu_b_buf.typed_data<float>()}
                             : ReluGate{nullptr, nullptr};
  float* sum_dy = sum_dy_buf->typed_data<float>();
  float* sum_dy_xc = sum_dy_xc_buf->typed_data<float>();
  return WithFloatType(x_buf, "jaxbn_backward expects float32 or bfloat16 dy and x",
                       [&](auto* type) {
                         using T = std::remove_pointer_t<decltype(type)>;
                         ComputeBackward(pool, v, Data<T>(dy_buf), Data<T>(x_buf), terms,
                                         *weights, gate, epsilon, stream,
                                         input_grad ? Data<T>(*dx_buf) : nullptr,
                                         sum_dy, sum_dy_xc);
                       });
}


}  // namespace

#endif  // JAXBN_CSRC_BACKWARD_H_
