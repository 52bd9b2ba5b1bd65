// What every kernel shares: SIMD lanes, bfloat16, the view of x, work plans,
// the thread pool's parallel loop, row weights. Part of kernels.cc (one
// translation unit, so the hot loops inline across files).
#ifndef JAXBN_CSRC_COMMON_H_
#define JAXBN_CSRC_COMMON_H_


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <unistd.h>
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
// clone), and call it per row from the AVX2 clone, several times slower.
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
  // to the data's (with many channels, many parts would make the merges a
  // large share of the time).
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
// from measurements. From WideRowChannels() on, the partial sums and the
// mean (3 C floats) no longer stay in L1 beside the rows streaming through
// it, and loading and storing them once per row goes to L2: there four rows
// per step win again (below it, with a 48 KB L1, one row per step is
// faster; the figures are in CHANGELOG). That bound is the L1's: 3072
// channels for a 48 KB L1, 2048 for a 32 KB one (L1 / 16 bytes), read from
// the running machine once.
inline int64_t WideRowChannels() {
  static const int64_t channels = [] {
    long l1 = 0;
#ifdef _SC_LEVEL1_DCACHE_SIZE
    l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#endif
    return static_cast<int64_t>(l1 > 0 ? l1 : 48 * 1024) / 16;
  }();
  return channels;
}

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


// ------------------------------------------------------------- stores

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

// ------------------------------------------------------ dtype dispatch

// A buffer's elements as float or BF16 (the kernels' two element types).
template <class T>
const T* Data(const ffi::AnyBuffer& buffer) {
  return static_cast<const T*>(buffer.untyped_data());
}
template <class T>
T* Data(ffi::AnyBuffer& buffer) {
  return static_cast<T*>(buffer.untyped_data());
}

// Calls f(static_cast<T*>(nullptr)) with T = float or BF16, the element type
// of `like`; any other type is an InvalidArgument error saying `message`.
template <class F>
ffi::Error WithFloatType(const ffi::AnyBuffer& like, const char* message, const F& f) {
  switch (like.element_type()) {
    case ffi::F32:
      f(static_cast<float*>(nullptr));
      return ffi::Error::Success();
    case ffi::BF16:
      f(static_cast<BF16*>(nullptr));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(message);
  }
}

}  // namespace

#endif  // JAXBN_CSRC_COMMON_H_
