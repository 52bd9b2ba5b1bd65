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

// The passes in the order they run.
#include "moments.h"
#include "gradient_sums.h"
#include "input_gradient.h"
#include "output.h"
#include "backward.h"


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
                                  .Attr<bool>("units")
                                  .Attr<bool>("input_grad"));
