// CPU kernels for jaxbn's fast training path, called through the XLA FFI.
//
// XLA:CPU runs each reduction of batch norm as its own pass over memory and
// evaluates any elementwise producer of a reduction (x - mean, dy * (x - mean))
// at about half the speed of a plain sum. These kernels do the statistics in
// one read each, and the backward's elementwise pass with streaming stores:
//
//   jaxbn_moments:   x[..., A1, G, A, C, B] -> mean[..., G, C], M2[..., G, C]
//                    (x in its own shape, the view given as attributes;
//                    A1 = G = 1 but for virtual batches, see View)
//       M2 = sum (x - mean)^2 over A and B, exact: every block (16 KB or
//       64 rows) is reduced with the corrected two-pass algorithm while it
//       sits in cache, and blocks are accumulated in double as sums shifted
//       by a data value of their channel, which makes parts plain sums.
//   jaxbn_grad_sums: dy, x[..., A1, G, A, C, B], mean[..., G, C]
//                        -> sum dy[..., G, C], sum dy * (x - mean)[..., G, C]
//       float32 sums per block, double across blocks.
//   jaxbn_input_grad: dy, x, (a, c, d, m)[..., 4, C]
//                         -> dx = a dy + c (x - m) + d
//       the backward's last pass, with streaming stores for big outputs,
//       which XLA:CPU does not emit.
//   jaxbn_backward: dy, x and per-channel mean, variance, scale, their
//       cotangents, the count and optionally per-channel units -> dx,
//       sum dy, sum dy * (x - mean): the whole backward in one call: the
//       gradient sums, the input gradient's coefficients from them, then
//       the input gradient.
//
// x, dy and dx are float32 or bfloat16 (computed in float32); statistics and
// coefficients are float32.
//
// The forward's output pass stays in XLA, where it fuses with what follows
// (an add, a ReLU). The input gradient usually feeds a convolution's or a
// matmul's backward, which fuses nothing. Work is split into a number of parts
// that depends on the shape only and results are merged in part order, so the
// answer is bit-identical whatever the thread count or scheduling.
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Eight floats; GCC and Clang lower it to one AVX or two SSE registers.
typedef float Vec __attribute__((vector_size(32)));
constexpr int64_t kVec = 8;
constexpr int64_t kLanes = 2 * kVec;      // channels or elements per step
// Blocks of rows hold kBlockElems (16 KB, L1) or kMinRowsPerBlock rows,
// whichever is more: the per-block work on per-channel vectors (merging a
// block's float sums into double) needs rows to amortize it.
constexpr int64_t kBlockElems = 4096;
constexpr int64_t kMinRowsPerBlock = 64;
constexpr int64_t kElemsPerPart = 1 << 16;
constexpr int64_t kElemsPerPartPerChannel = 256;
constexpr int64_t kMaxParts = 64;

// Lambdas inside the hot loops are inlined by force: GCC may otherwise emit
// one out of line, compiled for the baseline ISA (a lambda is not a target
// clone), and call it per row from the AVX2 clone: 4-5x slower.
#define JAXBN_INLINE __attribute__((always_inline))

// The hot loops are compiled twice on x86-64: for AVX2 + FMA and for the
// baseline ISA; the loader picks one at run time (GCC/Clang ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define JAXBN_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define JAXBN_HOT
#endif

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A bfloat16 is the top half of a float32's bits.
struct BF16 {
  uint16_t bits;
};
typedef uint16_t Halves __attribute__((vector_size(kVec * 2)));
typedef uint32_t Words __attribute__((vector_size(kVec * 4)));

inline Vec Load(const BF16* p) {
  Halves h;
  std::memcpy(&h, p, sizeof(h));
  const Words w = __builtin_convertvector(h, Words) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline float ToFloat(float v) { return v; }
inline float ToFloat(BF16 v) {
  const uint32_t w = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline float Sum(Vec v) {
  float s = 0.f;
  for (int64_t j = 0; j < kVec; ++j) s += v[j];
  return s;
}

// ------------------------------------------------------------- threading

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs body(part) for every part in [0, parts) on the calling thread and on
// idle threads of XLA's intra-op pool. Late helpers find no work left and only
// touch the shared progress counters, which they keep alive.
template <class Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, const Body& body) {
  auto progress = std::make_shared<Progress>();
  const Body* shared_body = &body;
  auto work = [progress, parts, shared_body]() {
    for (int64_t p; (p = progress->next.fetch_add(1)) < parts;) {
      (*shared_body)(p);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  // The calling thread works too: one helper fewer than the pool's threads
  // keeps one worker per core.
  const int64_t helpers =
      std::min<int64_t>(std::max<int64_t>(pool.num_threads() - 1, 1), parts - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (progress->done.load(std::memory_order_acquire) < parts) {
    std::this_thread::yield();
  }
}

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

// The data as `problems` independent reductions to C values each. One call's
// x is (A1, G, A, C, B) in row-major order: G problems, each reducing over
// A1, A and B (a virtual batch of Keras' strided layout has A1 = its size
// and G = the number of virtual batches; a plain batch norm has A1 = G = 1).
// A problem is A1 chunks of (A, C, B) elements, G chunks apart.
struct View {
  int64_t problems, a1, g, a, c, b;
  int64_t ChunkElems() const { return a * c * b; }
  // The offset of chunk i1 of problem p, in elements from the start of x.
  int64_t ChunkOffset(int64_t p, int64_t i1) const {
    const int64_t outer = p / g, group = p % g;
    return ((outer * a1 + i1) * g + group) * ChunkElems();
  }
};

// x arrives in its own shape (reshaping a bfloat16 operand costs XLA:CPU a
// copy) with the view of one call as attributes: `rank` trailing dimensions
// that are (a1, g, a, c, b) in row-major order; leading dimensions (vmap's)
// multiply the independent problems.
std::optional<View> ViewOf(ffi::Span<const int64_t> dims, int64_t rank, int64_t a1,
                           int64_t g, int64_t a, int64_t c, int64_t b) {
  const int64_t leading = static_cast<int64_t>(dims.size()) - rank;
  if (leading < 0 || a1 < 1 || g < 1) return std::nullopt;
  View v{g, a1, g, a, c, b};
  int64_t call = 1;
  for (int64_t i = 0; i < leading; ++i) v.problems *= dims[i];
  for (int64_t i = leading; i < static_cast<int64_t>(dims.size()); ++i) call *= dims[i];
  if (call != a1 * g * a * c * b) return std::nullopt;
  return v;
}

// Work items of one problem: per chunk, blocks of rows when B == 1 (channels
// last), runs of B contiguous elements of one channel otherwise.
struct Plan {
  int64_t rows_per_block;  // B == 1 only
  int64_t items_per_chunk;
  int64_t items;
  int64_t parts;
};

Plan PlanFor(const View& v) {
  Plan plan{};
  int64_t item_elems;
  if (v.b == 1) {
    plan.rows_per_block =
        std::max<int64_t>(kMinRowsPerBlock, kBlockElems / std::max<int64_t>(v.c, 1));
    plan.items_per_chunk = (v.a + plan.rows_per_block - 1) / plan.rows_per_block;
    item_elems = plan.rows_per_block * v.c;
  } else {
    plan.rows_per_block = 0;
    plan.items_per_chunk = v.a * v.c;
    item_elems = v.b;
  }
  plan.items = v.a1 * plan.items_per_chunk;
  const int64_t total = plan.items * item_elems;
  // Each part has its own per-channel accumulators, which it zeroes, fills
  // and hands to the merge, and the merge runs on one thread: at least
  // kElemsPerPartPerChannel elements per channel keep that work small next
  // to the data's (at 128, 3584 channels of 103 MB made 56 parts, and their
  // merges a quarter to a third of the moments' and gradient sums' time).
  const int64_t part_elems =
      std::max(kElemsPerPart, kElemsPerPartPerChannel * v.c);
  plan.parts = std::clamp<int64_t>(total / part_elems, 1, kMaxParts);
  plan.parts = std::max<int64_t>(1, std::min(plan.parts, plan.items));
  return plan;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Visits the blocks of one task (problem o = task / parts, part p): for
// B == 1, row_block(offset, rows) per block of rows; otherwise
// run_block(offset, channel, n) per block of a channel's run. Offsets are in
// elements from the start of x.
template <class RowBlock, class RunBlock>
void ForEachBlock(const View& v, const Plan& plan, int64_t task,
                  const RowBlock& row_block, const RunBlock& run_block) {
  const int64_t o = task / plan.parts, p = task % plan.parts;
  const int64_t first = plan.items * p / plan.parts;
  const int64_t last = plan.items * (p + 1) / plan.parts;
  for (int64_t item = first; item < last; ++item) {
    const int64_t chunk = v.ChunkOffset(o, item / plan.items_per_chunk);
    const int64_t j = item % plan.items_per_chunk;
    if (v.b == 1) {
      const int64_t r0 = j * plan.rows_per_block;
      row_block(chunk + r0 * v.c, std::min(v.a, r0 + plan.rows_per_block) - r0);
    } else {
      for (int64_t b0 = 0; b0 < v.b; b0 += kBlockElems) {
        run_block(chunk + j * v.b + b0, j % v.c, std::min(v.b - b0, kBlockElems));
      }
    }
  }
}

// Lane types of the row-block loops: vectors, then single floats for the
// channels left over.
template <class In> inline Vec LoadLanes(const In* p, Vec) { return Load(p); }
template <class In> inline float LoadLanes(const In* p, float) { return ToFloat(*p); }
inline void StoreLanes(float* p, Vec v) { Store(p, v); }
inline void StoreLanes(float* p, float v) { *p = v; }

// Calls f(lanes, c) for the channels of a row: vectors, then single floats.
template <class F>
[[gnu::always_inline]] inline void ForEachLanes(int64_t channels, const F& f) {
  int64_t c = 0;
  for (; c + kVec <= channels; c += kVec) f(Vec{}, c);
  for (; c < channels; ++c) f(0.f, c);
}

template <int R> using RowCount = std::integral_constant<int, R>;

template <int R, class Step>
[[gnu::always_inline]] inline void ForEachRowStep(int64_t rows, const Step& step) {
  int64_t i = 0;
  for (; i + R <= rows; i += R) step(i, RowCount<R>{});
  for (; i < rows; ++i) step(i, RowCount<1>{});
}

// The same with R = `rows_per_step` (4, 2 or 1) chosen at run time. The
// per-channel partial sums live in memory (C can be large); several rows per
// step load and store them once per step instead of once per row. But each
// row of a step is a separate stream for the hardware prefetchers, which for
// wide rows costs more than it saves: the call sites choose R per kernel
// from measurements. From kWideRowChannels on, the partial sums and the
// mean (3 C floats) no longer stay in L1 beside the rows streaming through
// it, and loading and storing them once per row goes to L2: there four rows
// per step win again (at 103 MB, 3584 channels, two runs: moments 3.9-4.9
// -> 3.7-3.8 ms, sums 5.2-5.4 -> 4.5 ms; at 2048 channels one row per step
// is still faster, by 0.6 and 1.0 ms, with a 48 KB L1).
constexpr int64_t kWideRowChannels = 3072;

template <class Step>
[[gnu::always_inline]] inline void ForEachRowStep(int64_t rows, int rows_per_step,
                                                  const Step& step) {
  if (rows_per_step == 4) {
    ForEachRowStep<4>(rows, step);
  } else if (rows_per_step == 2) {
    ForEachRowStep<2>(rows, step);
  } else {
    ForEachRowStep<1>(rows, step);
  }
}

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
  ForEachRowStep(rows, C <= 64 || C >= kWideRowChannels ? 4 : 1, [&](int64_t i, auto step) JAXBN_INLINE {
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

// Row weights (a mask) arrive as one float32 per (A1, G, A) row of x when
// `masked`; otherwise the operand is a placeholder.
std::optional<const float*> RowWeights(const ffi::AnyBuffer& w_buf, bool masked,
                                       const View& v, size_t x_elems) {
  if (!masked) return nullptr;
  if (w_buf.element_type() != ffi::F32 || v.c * v.b == 0 ||
      w_buf.element_count() * v.c * v.b != x_elems) {
    return std::nullopt;
  }
  return w_buf.typed_data<float>();
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
  switch (x_buf.element_type()) {
    case ffi::F32:
      ComputeMoments(pool, v, static_cast<const float*>(x_buf.untyped_data()), w, mean, m2);
      return ffi::Error::Success();
    case ffi::BF16:
      ComputeMoments(pool, v, static_cast<const BF16*>(x_buf.untyped_data()), w, mean, m2);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("jaxbn_moments expects float32 or bfloat16 x");
  }
}

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
  ForEachRowStep(rows, C <= 32 || C >= kWideRowChannels ? 4 : C <= 64 ? 2 : 1, [&](int64_t i, auto step) JAXBN_INLINE {
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
  // read once they outgrow the cache: 3584 channels x 56 parts cost 0.7 ms of
  // the sums' 7.6).
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
  switch (x_buf.element_type()) {
    case ffi::F32:
      ComputeGradSums(pool, v, static_cast<const float*>(dy_buf.untyped_data()),
                      static_cast<const float*>(x_buf.untyped_data()), mean, nullptr, {}, sum_dy,
                      sum_dy_xc);
      return ffi::Error::Success();
    case ffi::BF16:
      ComputeGradSums(pool, v, static_cast<const BF16*>(dy_buf.untyped_data()),
                      static_cast<const BF16*>(x_buf.untyped_data()), mean, nullptr, {}, sum_dy,
                      sum_dy_xc);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "jaxbn_grad_sums expects float32 or bfloat16 dy and x");
  }
}


// --------------------------------------------------------- input gradient

// dx = a * dy + c * (x - m) + d with per-channel a, c, d and the mean m:
// the last pass of the backward. Centred on the mean, as the forward: c x + d'
// with d' = d - c m would cancel where |mean| >> std. With `stream` (the caller sets it for outputs larger than a
// quarter of the last-level cache) results go out with streaming stores,
// which bypass the cache: a plain store first reads the line it overwrites
// from memory, a streaming store does not.

// float32 -> bfloat16, rounding to nearest even; NaNs stay (quiet) NaNs.
inline uint16_t ToBF16(float v) {
  uint32_t w;
  std::memcpy(&w, &v, sizeof(w));
  if ((w & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((w >> 16) | 0x40u);
  return static_cast<uint16_t>((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}
inline Halves ToBF16(Vec v) {
  Words w;
  std::memcpy(&w, &v, sizeof(w));
  const Words rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
  const Words quiet_nan = (w >> 16) | 0x40u;
  const Words is_nan = (w & 0x7fffffffu) > 0x7f800000u;
  return __builtin_convertvector(is_nan ? quiet_nan : rounded, Halves);
}

inline void StoreLanes(BF16* p, Vec v) {
  const Halves h = ToBF16(v);
  std::memcpy(p, &h, sizeof(h));
}
inline void StoreLanes(BF16* p, float v) { p->bits = ToBF16(v); }

// Streaming stores need 16-byte alignment: rows or runs whose start is not
// aligned take plain stores.
inline void StreamLanes(float* p, Vec v) {
#if defined(__SSE2__)
  __m128 half[2];
  std::memcpy(half, &v, sizeof(v));
  _mm_stream_ps(p, half[0]);
  _mm_stream_ps(p + 4, half[1]);
#else
  Store(p, v);
#endif
}
inline void StreamLanes(BF16* p, Vec v) {
#if defined(__SSE2__)
  const Halves h = ToBF16(v);
  __m128i bits;
  std::memcpy(&bits, &h, sizeof(h));
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), bits);
#else
  StoreLanes(p, v);
#endif
}
template <class Out> inline void StreamLanes(Out* p, float v) { StoreLanes(p, v); }

template <bool kStream, class Out, class V>
inline void PutLanes(Out* p, V v) {
  if constexpr (kStream) {
    StreamLanes(p, v);
  } else {
    StoreLanes(p, v);
  }
}

inline bool StreamAligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

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
    if (channels < kWideRowChannels) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t o = i * channels;
        WithStores(stream, dx + o, [&](auto kind) JAXBN_INLINE {
          RowStepInputGrad<decltype(kind)::value, decltype(gated)::value, 1>(
              dy + o, x + o, a, c, d, m, gate, channels, dx + o);
        });
      }
      return;
    }
    // From kWideRowChannels channels on, four rows at a time: the
    // coefficients (4 floats a channel: 57 KB for 3584 channels) no longer
    // stay in L1 beside the rows streaming through it, and each is loaded
    // once for four rows instead of once a row (at 103 MB, 3584 channels:
    // 6.6-6.8 -> 6.1-6.3 ms in three interleaved runs, against 5.1-5.3 for 64
    // channels).
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
  switch (x_buf.element_type()) {
    case ffi::F32:
      ComputeInputGrad(pool, v, static_cast<const float*>(dy_buf.untyped_data()),
                       static_cast<const float*>(x_buf.untyped_data()), coefficients,
                       *weights, {}, stream, static_cast<float*>(dx_buf->untyped_data()));
      return ffi::Error::Success();
    case ffi::BF16:
      ComputeInputGrad(pool, v, static_cast<const BF16*>(dy_buf.untyped_data()),
                       static_cast<const BF16*>(x_buf.untyped_data()), coefficients,
                       *weights, {}, stream, static_cast<BF16*>(dx_buf->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "jaxbn_input_grad expects float32 or bfloat16 dy and x");
  }
}

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
  switch (x_buf.element_type()) {
    case ffi::F32:
      ComputeOutput(pool, *view, static_cast<const float*>(x_buf.untyped_data()), terms, relu,
                    stream, static_cast<float*>(y_buf->untyped_data()));
      return ffi::Error::Success();
    case ffi::BF16:
      ComputeOutput(pool, *view, static_cast<const BF16*>(x_buf.untyped_data()), terms, relu,
                    stream, static_cast<BF16*>(y_buf->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("jaxbn_normalize expects float32 or bfloat16 x");
  }
}

// ------------------------------------------------------- whole backward

// The backward in one call. Its two passes run back to back, so the second
// finds in cache what the first left there, where XLA would schedule other
// work between two separate calls. Per channel, with n the count,
// inv = 1 / sqrt(var + epsilon), S1 = sum dy and S2 = sum dy (x - mean):
//   a = gamma inv,  dL/dmean = -a S1 + dmean,  dL/dvar = -gamma inv^3 S2 / 2 + dvar,
//   c = 2 dL/dvar / n,  d = dL/dmean / n - c mean   (c = d = 0 where n = 0),
// in double, then dx = a dy + c x + d. With a fused ReLU, dy is gated
// (ReluGate) in both passes.
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
                          float epsilon, bool masked, bool relu, bool units) {
  const std::optional<View> view = ViewOf(x_buf.dimensions(), rank, a1, g, a, c, b);
  const std::optional<const float*> weights =
      view ? RowWeights(w_buf, masked, *view, x_buf.element_count()) : std::nullopt;
  bool valid = view.has_value() && weights.has_value() &&
               dy_buf.element_type() == x_buf.element_type() &&
               dx_buf->element_type() == x_buf.element_type() &&
               dy_buf.element_count() == x_buf.element_count() &&
               dx_buf->element_count() == x_buf.element_count();
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
  switch (x_buf.element_type()) {
    case ffi::F32:
      ComputeBackward(pool, v, static_cast<const float*>(dy_buf.untyped_data()),
                      static_cast<const float*>(x_buf.untyped_data()), terms, *weights, gate,
                      epsilon, stream,
                      static_cast<float*>(dx_buf->untyped_data()), sum_dy, sum_dy_xc);
      return ffi::Error::Success();
    case ffi::BF16:
      ComputeBackward(pool, v, static_cast<const BF16*>(dy_buf.untyped_data()),
                      static_cast<const BF16*>(x_buf.untyped_data()), terms, *weights, gate,
                      epsilon, stream,
                      static_cast<BF16*>(dx_buf->untyped_data()), sum_dy, sum_dy_xc);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "jaxbn_backward expects float32 or bfloat16 dy and x");
  }
}

}  // namespace

namespace {

// The kernels take the view of one problem as attributes (see ViewOf).
template <class Binding>
auto WithViewAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("rank")
      .template Attr<int64_t>("a1")
      .template Attr<int64_t>("g")
      .template Attr<int64_t>("a")
      .template Attr<int64_t>("c")
      .template Attr<int64_t>("b");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMoments, MomentsKernel,
                              WithViewAttributes(ffi::Ffi::Bind()
                                                     .Ctx<ffi::ThreadPool>()
                                                     .Arg<ffi::AnyBuffer>()  // x
                                                     .Arg<ffi::AnyBuffer>()  // row weights
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>())
                                  .Attr<bool>("masked"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradSums, GradSumsKernel,
                              WithViewAttributes(ffi::Ffi::Bind()
                                                     .Ctx<ffi::ThreadPool>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnInputGrad, InputGradKernel,
                              WithViewAttributes(ffi::Ffi::Bind()
                                                     .Ctx<ffi::ThreadPool>()
                                                     .Arg<ffi::AnyBuffer>()  // dy
                                                     .Arg<ffi::AnyBuffer>()  // x
                                                     .Arg<ffi::AnyBuffer>()  // (a, c, d)
                                                     .Arg<ffi::AnyBuffer>()  // row weights
                                                     .Ret<ffi::AnyBuffer>())
                                  .Attr<bool>("stream")
                                  .Attr<bool>("masked"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnNormalize, OutputKernel,
                              WithViewAttributes(ffi::Ffi::Bind()
                                                     .Ctx<ffi::ThreadPool>()
                                                     .Arg<ffi::AnyBuffer>()  // x
                                                     .Arg<ffi::AnyBuffer>()  // (u, m, a, b)
                                                     .Ret<ffi::AnyBuffer>())  // y
                                  .Attr<bool>("stream")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBackward, BackwardKernel,
                              WithViewAttributes(ffi::Ffi::Bind()
                                                     .Ctx<ffi::ThreadPool>()
                                                     .Arg<ffi::AnyBuffer>()  // dy
                                                     .Arg<ffi::AnyBuffer>()  // x
                                                     .Arg<ffi::AnyBuffer>()  // mean
                                                     .Arg<ffi::AnyBuffer>()  // variance
                                                     .Arg<ffi::AnyBuffer>()  // scale
                                                     .Arg<ffi::AnyBuffer>()  // d_mean
                                                     .Arg<ffi::AnyBuffer>()  // d_variance
                                                     .Arg<ffi::AnyBuffer>()  // count
                                                     .Arg<ffi::AnyBuffer>()  // 1 / unit
                                                     .Arg<ffi::AnyBuffer>()  // row weights
                                                     .Arg<ffi::AnyBuffer>()  // ReLU's a
                                                     .Arg<ffi::AnyBuffer>()  // ReLU's b
                                                     .Ret<ffi::AnyBuffer>()  // dx
                                                     .Ret<ffi::AnyBuffer>()  // sum dy
                                                     .Ret<ffi::AnyBuffer>())  // sum dy (x - mean)
                                  .Attr<bool>("stream")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("masked")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("units"));

// ------------------------------------------------------- Python module

namespace {

PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* handlers = PyDict_New();
  if (handlers == nullptr) return nullptr;
  const std::pair<const char*, void*> entries[] = {
      {"jaxbn_moments", reinterpret_cast<void*>(JaxbnMoments)},
      {"jaxbn_grad_sums", reinterpret_cast<void*>(JaxbnGradSums)},
      {"jaxbn_input_grad", reinterpret_cast<void*>(JaxbnInputGrad)},
      {"jaxbn_backward", reinterpret_cast<void*>(JaxbnBackward)},
      {"jaxbn_normalize", reinterpret_cast<void*>(JaxbnNormalize)},
  };
  for (const auto& [name, fn] : entries) {
    PyObject* capsule = PyCapsule_New(fn, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(handlers, name, capsule)) {
      Py_XDECREF(capsule);
      Py_DECREF(handlers);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return handlers;
}

#ifndef JAXBN_BUILT_WITH_JAXLIB
#define JAXBN_BUILT_WITH_JAXLIB "unknown"
#endif

// What the kernels were compiled against: jaxbn registers them only with a
// jaxlib whose XLA FFI accepts that API version.
PyObject* BuildInfo(PyObject*, PyObject*) {
  return Py_BuildValue("{s:(ii),s:s}", "ffi_api", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR,
                       "jaxlib", JAXBN_BUILT_WITH_JAXLIB);
}

PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS,
     "{target name: XLA FFI handler capsule} for the CPU kernels."},
    {"build_info", BuildInfo, METH_NOARGS,
     "{'ffi_api': (major, minor), 'jaxlib': version} the kernels were built with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                       "jaxbn's XLA FFI CPU kernels.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&kModule); }
