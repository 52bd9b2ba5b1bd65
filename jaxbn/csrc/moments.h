// jaxbn_moments: per-channel mean and M2 in one read of x.
#ifndef JAXBN_CSRC_MOMENTS_H_
#define JAXBN_CSRC_MOMENTS_H_

#include "common.h"

namespace {

// ------------------------------------------------------------ statistics

// Per-channel (count, mean, M2) in double, as sums shifted by a reference
// value per channel shared by every part of a problem: one of the channel's
// data values. Then S1 = sum n_b (mean_b - ref) and S2 = sum (M2_b + n_b
// (mean_b - ref)^2) over blocks b are plain sums, parts merge by addition,
// and M2 = S2 - S1^2 / n loses at most n * eps(double) relative to M2
// (a data value lies within sqrt(M2) of the mean), far below float32.
struct Moments {
  const double* ref;  // C values, shared
  std::vector<double> n, s1, s2;
  Moments(const double* reference, int64_t channels)
      : ref(reference), n(channels, 0.0), s1(channels, 0.0), s2(channels, 0.0) {}

  // A block of `nb` elements of channel c, reduced around a provisional
  // float32 mean `shift` to residual sums r = sum (x - shift) and
  // q = sum (x - shift)^2: its mean is shift + r / nb and its M2 is
  // q - r^2 / nb (the corrected two-pass algorithm).
  void Add(int64_t c, double nb, float shift, float r, float q) {
    const double mean_b = shift + double(r) / nb;
    const double d = mean_b - ref[c];
    n[c] += nb;
    s1[c] += nb * d;
    s2[c] += double(q) - double(r) * (double(r) / nb) + nb * d * d;
  }
  // The same for a block of `nb` rows of every channel.
  void AddRows(double nb, const float* shift, const float* r, const float* q) {
    for (size_t c = 0; c < n.size(); ++c) Add(c, nb, shift[c], r[c], q[c]);
  }
  void Absorb(const Moments& other) {
    for (size_t c = 0; c < n.size(); ++c) {
      n[c] += other.n[c];
      s1[c] += other.s1[c];
      s2[c] += other.s2[c];
    }
  }
  double Mean(int64_t c) const { return n[c] ? ref[c] + s1[c] / n[c] : 0.0; }
  // Rounding can make M2 slightly negative: 0 then. A NaN stays NaN (as in
  // XLA: std::max(0.0, NaN) would be 0).
  double M2(int64_t c) const {
    if (!n[c]) return 0.0;
    const double m2 = s2[c] - s1[c] * (s1[c] / n[c]);
    return m2 < 0.0 ? 0.0 : m2;
  }
};


// A block's per-channel sums in `scratch` (3 C floats, zeroed): the
// provisional mean s, then the residual sums r and q around it.
struct BlockSums {
  float *s, *r, *q;
  BlockSums(float* scratch, int64_t channels)
      : s(scratch), r(scratch + channels), q(scratch + 2 * channels) {
    std::fill(scratch, scratch + 3 * channels, 0.f);
  }
};

// Two passes over a row-major (rows, C) block while it sits in cache: the
// first gives a provisional mean, summing differences to the block's first
// row (a constant block then gives exactly its value, at any magnitude, and
// no sum overflows where the data do not), the second residual sums around
// it; added to `acc`. `scratch` holds 3 C floats.
template <class In>
[[gnu::always_inline]] inline void RowBlockMoments(const In* __restrict x, int64_t rows,
                                                   int64_t channels, float* __restrict scratch,
                                                   Moments& acc) {
  const BlockSums sums(scratch, channels);
  float* __restrict s = sums.s;
  float* __restrict r = sums.r;
  float* __restrict q = sums.q;
  const int64_t C = channels;
  ForEachRowStep(rows, C <= 64 || C >= WideRowChannels() ? 4 : 1, [&](int64_t i, auto step) JAXBN_INLINE {
    ForEachLanes(C, [&](auto t, int64_t c) JAXBN_INLINE {
      const auto* row = x + i * C + c;
      const auto first = LoadLanes(x + c, t);
      auto sum = LoadLanes(row, t) - first;
#pragma GCC unroll 4
      for (int k = 1; k < decltype(step)::value; ++k) {
        sum += LoadLanes(row + k * C, t) - first;
      }
      StoreLanes(s + c, LoadLanes(s + c, t) + sum);
    });
  });
  const float inv_rows = 1.0f / static_cast<float>(rows);
  for (int64_t c = 0; c < C; ++c) s[c] = ToFloat(x[c]) + s[c] * inv_rows;
  // The block is in cache now: four rows per step whatever C.
  ForEachRowStep<4>(rows, [&](int64_t i, auto step) JAXBN_INLINE {
    ForEachLanes(C, [&](auto t, int64_t c) JAXBN_INLINE {
      const auto* row = x + i * C + c;
      const auto m = LoadLanes(s + c, t);
      auto d = LoadLanes(row, t) - m;
      auto sum = d, sum_sq = d * d;
#pragma GCC unroll 4
      for (int k = 1; k < decltype(step)::value; ++k) {
        d = LoadLanes(row + k * C, t) - m;
        sum += d;
        sum_sq += d * d;
      }
      StoreLanes(r + c, LoadLanes(r + c, t) + sum);
      StoreLanes(q + c, LoadLanes(q + c, t) + sum_sq);
    });
  });
  acc.AddRows(rows, s, r, q);
}

// The same for `n` contiguous elements of one channel (n <= kBlockElems):
// the provisional mean and the residual sums around it.
template <class In>
[[gnu::always_inline]] inline void RunMoments(const In* __restrict x, int64_t n,
                                              float& shift, float& r, float& q) {
  const float first = ToFloat(x[0]);  // sums around it, as in RowBlockMoments
  const Vec f = first - Vec{};
  Vec s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    s0 += Load(x + i) - f;
    s1 += Load(x + i + kVec) - f;
  }
  float s = Sum(s0 + s1);
  for (; i < n; ++i) s += ToFloat(x[i]) - first;
  shift = first + s / static_cast<float>(n);
  const Vec m = shift - Vec{};
  Vec r0 = {}, r1 = {}, q0 = {}, q1 = {};
  i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec d0 = Load(x + i) - m, d1 = Load(x + i + kVec) - m;
    r0 += d0;
    r1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
  }
  r = Sum(r0 + r1);
  q = Sum(q0 + q1);
  for (; i < n; ++i) {
    const float d = ToFloat(x[i]) - shift;
    r += d;
    q += d * d;
  }
}

// The same for a block whose rows carry weights `w` (a mask): rows of weight
// 0 are skipped (whatever they hold), the others count w times.
template <class In>
[[gnu::always_inline]] inline void WeightedRowBlockMoments(const In* __restrict x,
                                                           const float* __restrict w,
                                                           int64_t rows, int64_t channels,
                                                           float* __restrict scratch,
                                                           Moments& acc) {
  const BlockSums sums(scratch, channels);
  float* __restrict s = sums.s;
  float* __restrict r = sums.r;
  float* __restrict q = sums.q;
  const int64_t C = channels;
  int64_t first = 0;  // the first counted row: sums around it
  while (first < rows && w[first] == 0.f) ++first;
  if (first == rows) return;
  const In* x0 = x + first * C;
  float total = 0.f;
  for (int64_t i = first; i < rows; ++i) {
    if (w[i] == 0.f) continue;
    total += w[i];
    const float wi = w[i];
    ForEachLanes(C, [&](auto t, int64_t c) JAXBN_INLINE {
      StoreLanes(s + c, LoadLanes(s + c, t) +
                            wi * (LoadLanes(x + i * C + c, t) - LoadLanes(x0 + c, t)));
    });
  }
  const float inv_total = 1.0f / total;
  for (int64_t c = 0; c < C; ++c) s[c] = ToFloat(x0[c]) + s[c] * inv_total;
  for (int64_t i = 0; i < rows; ++i) {
    if (w[i] == 0.f) continue;
    const float wi = w[i];
    ForEachLanes(C, [&](auto t, int64_t c) JAXBN_INLINE {
      const auto d = LoadLanes(x + i * C + c, t) - LoadLanes(s + c, t);
      StoreLanes(r + c, LoadLanes(r + c, t) + wi * d);
      StoreLanes(q + c, LoadLanes(q + c, t) + wi * (d * d));
    });
  }
  acc.AddRows(total, s, r, q);
}

// The hot loops, compiled per input type (and per ISA, see JAXBN_HOT).
JAXBN_HOT void WeightedMomentsBlock(const float* x, const float* w, int64_t rows,
                                    int64_t channels, float* scratch, Moments& acc) {
  WeightedRowBlockMoments(x, w, rows, channels, scratch, acc);
}
JAXBN_HOT void WeightedMomentsBlock(const BF16* x, const float* w, int64_t rows,
                                    int64_t channels, float* scratch, Moments& acc) {
  WeightedRowBlockMoments(x, w, rows, channels, scratch, acc);
}
JAXBN_HOT void MomentsBlock(const float* x, int64_t rows, int64_t channels,
                            float* scratch, Moments& acc) {
  RowBlockMoments(x, rows, channels, scratch, acc);
}
JAXBN_HOT void MomentsBlock(const BF16* x, int64_t rows, int64_t channels,
                            float* scratch, Moments& acc) {
  RowBlockMoments(x, rows, channels, scratch, acc);
}
JAXBN_HOT void MomentsRun(const float* x, int64_t n, float& shift, float& r, float& q) {
  RunMoments(x, n, shift, r, q);
}
JAXBN_HOT void MomentsRun(const BF16* x, int64_t n, float& shift, float& r, float& q) {
  RunMoments(x, n, shift, r, q);
}

// The offset of the first row of problem o whose weight is not 0 (rows are
// the (A1, G, A) indices; their weights are `w`), or -1.
int64_t FirstCountedRow(const View& v, const float* w, int64_t o) {
  for (int64_t i1 = 0; i1 < v.a1; ++i1) {
    const int64_t chunk = v.ChunkOffset(o, i1);
    for (int64_t i = 0; i < v.a; ++i) {
      const int64_t row = chunk + i * v.c * v.b;
      if (w == nullptr || w[row / (v.c * v.b)] != 0.f) return row;
    }
  }
  return -1;
}

template <class In>
void ComputeMoments(ffi::ThreadPool& pool, const View& v, const In* x, const float* w,
                    float* mean_out, float* m2_out) {
  const Plan plan = PlanFor(v);
  // The reference of each channel: its first counted value in the problem.
  std::vector<double> ref(v.problems * v.c, 0.0);
  if (v.a > 0 && v.b > 0) {
    for (int64_t o = 0; o < v.problems; ++o) {
      const int64_t row = FirstCountedRow(v, w, o);
      if (row < 0) continue;
      for (int64_t c = 0; c < v.c; ++c) ref[o * v.c + c] = ToFloat(x[row + c * v.b]);
    }
  }
  std::vector<Moments> parts;
  parts.reserve(v.problems * plan.parts);
  for (int64_t task = 0; task < v.problems * plan.parts; ++task) {
    parts.emplace_back(ref.data() + task / plan.parts * v.c, v.c);
  }
  ParallelFor(pool, v.problems * plan.parts, [&](int64_t task) {
    Moments& acc = parts[task];
    std::vector<float> scratch(3 * v.c);
    ForEachBlock(
        v, plan, task,
        [&](int64_t offset, int64_t rows) {
          if (w == nullptr) {
            MomentsBlock(x + offset, rows, v.c, scratch.data(), acc);
          } else {
            WeightedMomentsBlock(x + offset, w + offset / v.c, rows, v.c, scratch.data(),
                                 acc);
          }
        },
        [&](int64_t offset, int64_t c, int64_t n) {
          // one row's run: one weight
          const float weight = w == nullptr ? 1.f : w[offset / (v.c * v.b)];
          if (weight == 0.f) return;
          float shift, r, q;
          MomentsRun(x + offset, n, shift, r, q);
          acc.Add(c, weight * n, shift, weight * r, weight * q);
        });
  });
  for (int64_t o = 0; o < v.problems; ++o) {
    Moments total(ref.data() + o * v.c, v.c);
    for (int64_t p = 0; p < plan.parts; ++p) total.Absorb(parts[o * plan.parts + p]);
    for (int64_t c = 0; c < v.c; ++c) {
      mean_out[o * v.c + c] = static_cast<float>(total.Mean(c));
      m2_out[o * v.c + c] = static_cast<float>(total.M2(c));
    }
  }
}

ffi::Error MomentsKernel(ffi::ThreadPool pool, ffi::AnyBuffer x_buf, ffi::AnyBuffer w_buf,
                         ffi::Result<ffi::AnyBuffer> mean_buf,
                         ffi::Result<ffi::AnyBuffer> m2_buf, int64_t rank, int64_t a1,
                         int64_t g, int64_t a, int64_t c, int64_t b, bool masked) {
  const std::optional<View> view = ViewOf(x_buf.dimensions(), rank, a1, g, a, c, b);
  const std::optional<const float*> weights =
      view ? RowWeights(w_buf, masked, *view, x_buf.element_count()) : std::nullopt;
  if (!view || !weights) {
    return ffi::Error::InvalidArgument(
        "jaxbn_moments: x does not match (a1, g, a, c, b), or the float32 row "
        "weights do not match x");
  }
  const View& v = *view;
  const float* w = *weights;
  float* mean = mean_buf->typed_data<float>();
  float* m2 = m2_buf->typed_data<float>();
  return WithFloatType(x_buf, "jaxbn_moments expects float32 or bfloat16 x",
                       [&](auto* type) {
                         using T = std::remove_pointer_t<decltype(type)>;
                         ComputeMoments(pool, v, Data<T>(x_buf), w, mean, m2);
                       });
}

}  // namespace

#endif  // JAXBN_CSRC_MOMENTS_H_
