"""CPU kernels for the fast path's backward and statistics (XLA FFI), and when to use them.

On CPU, XLA runs every reduction as its own pass and evaluates an elementwise
producer inside a reduction (``x - mean``, ``dy * (x - mean)``) at about half
the speed of a plain sum. Two small C++ kernels (``jaxbn/csrc``) read the data
once instead, a third writes the input gradient, and a fourth runs the whole
backward:

* ``moments``: ``x -> (mean, M2)`` per channel, exact (two passes over each
  cache-resident block, blocks added in float64 as sums shifted by one data
  value of the channel);
* ``grad_sums``: ``(dy, x, mean) -> (sum dy, sum dy * (x - mean))``;
* ``input_grad``: ``dx = a * dy + c * x + d``, the backward's last pass.
  XLA:CPU writes every output through the cache, which first reads each
  line it overwrites; for outputs larger than a quarter of the last-level
  cache the kernel uses streaming stores instead, which skip that read.
  The input gradient feeds a convolution's or matmul's backward in the
  networks batch norm lives in, which fuse nothing, so nothing is lost by
  taking the pass out of XLA.
* ``backward``: the two above and the coefficients between them in one
  call, for a backward with no statistics to combine across devices: the
  second pass then follows the first at once and finds in cache what it left
  there, where XLA's scheduler (breadth-first on CPU) puts other work of the
  same depth between two separate calls.

The statistics are bit-deterministic (a fixed, shape-only split of the work;
partial results merged in order). The forward's output pass stays in XLA,
where it fuses with its neighbours (an add, a ReLU). Each kernel but
``backward`` carries a ``custom_jvp`` written in plain JAX (``jaxbn.fused``
differentiates ``backward`` as the two-call backward it equals), so ``jvp``,
``grad`` and ``grad`` of ``grad`` differentiate through them; ``ffi_call``'s
``broadcast_all`` batching makes ``vmap`` one kernel call.

When they run: float32 or bfloat16 data (read as is, accumulated in float32
and float64), no mask, channel axes contiguous in memory
(NHWC, NCHW, (N, C), any rank), on the CPU backend, and

* ``mode 'auto'`` (default): only when the process sees one device. A custom
  call cannot be partitioned by sharded ``jit``: XLA would all-gather a
  batch-sharded input onto every device. Inputs whose sharding jit knows to
  split a reduced axis always stay in XLA; under ``shard_map`` or ``pmap`` the
  data are local and ``'on'`` is safe and fast.
* ``'on'`` / ``'off'``: always / never.

Set the mode with ``JAXBN_CPU_KERNELS=auto|on|off`` or :func:`set_mode` /
:func:`use` (read when a function is traced: jitted functions keep what they
were traced with). Without a compiled extension (no C++ compiler at install
time) everything runs in XLA; :func:`available` tells which.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import math
import os
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import manual_axes

try:  # built by setup.py when a C++ compiler is present
  from jaxbn import _cpu_kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the install
  _cpu_kernels = None

MODES = ("auto", "on", "off")
_mode = os.environ.get("JAXBN_CPU_KERNELS", "auto")
if _mode not in MODES:
  raise ValueError(
      f"JAXBN_CPU_KERNELS must be one of {MODES}; got {_mode!r}.")


def available() -> bool:
  """Whether the compiled kernels are installed."""
  return _cpu_kernels is not None


def set_mode(mode: str) -> None:
  """``'auto'`` (one device only), ``'on'`` or ``'off'``."""
  global _mode
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}.")
  _mode = mode


def get_mode() -> str:
  return _mode


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
  """Temporarily sets the mode (for the functions traced inside)."""
  previous = _mode
  set_mode(mode)
  try:
    yield
  finally:
    set_mode(previous)


if _cpu_kernels is not None:
  for _name, _handler in _cpu_kernels.handlers().items():
    jax.ffi.register_ffi_target(_name, _handler, platform="cpu")


class ChannelView(NamedTuple):
  """``x`` seen as ``(A, C, B)``: channels ``C`` between reduced ``A``, ``B``."""

  a: int
  c: int
  b: int


def channel_view(shape: Sequence[int],
                 reduction_axes: Sequence[int]) -> ChannelView | None:
  """The (A, C, B) view, or None when the kept axes are not contiguous."""
  kept = [i for i in range(len(shape)) if i not in set(reduction_axes)]
  if not kept or kept != list(range(kept[0], kept[-1] + 1)):
    return None
  first, last = kept[0], kept[-1] + 1
  return ChannelView(math.prod(shape[:first]), math.prod(shape[first:last]),
                     math.prod(shape[last:]))


INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def applicable(x: jax.Array, reduction_axes: Sequence[int], weights=None,
               dy: jax.Array | None = None,
               per_channel: jax.Array | None = None) -> ChannelView | None:
  """The view to run the kernels on, or None to stay in XLA.

  ``x`` (and ``dy``, of the same dtype) float32 or bfloat16, ``per_channel``
  values (a mean, coefficients) float32, no weights.
  """
  if _mode == "off" or _cpu_kernels is None or weights is not None:
    return None
  if _mode == "auto" and jax.device_count() != 1:
    return None
  if jnp.dtype(x.dtype) not in INPUT_DTYPES:
    return None
  if dy is not None and dy.dtype != x.dtype:
    return None
  if per_channel is not None and jnp.dtype(per_channel.dtype) != jnp.float32:
    return None
  if manual_axes.sharded_along(x, reduction_axes):  # would gather x
    return None
  return channel_view(x.shape, reduction_axes)


def _view_attributes(x, view: ChannelView):
  # x goes to the kernel in its own shape: XLA:CPU copies a bfloat16 operand
  # to reshape it, even where the reshape is free for float32.
  return dict(rank=np.int64(x.ndim), a=np.int64(view.a), c=np.int64(view.c),
              b=np.int64(view.b))


def _channel_sum(value, view: ChannelView):
  return jnp.sum(value.reshape(view).astype(jnp.float32), axis=(0, 2))


def _per_channel(vector, view: ChannelView):
  return vector.reshape(1, view.c, 1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def moments(x: jax.Array, view: ChannelView) -> tuple[jax.Array, jax.Array]:
  """``(mean, M2)``, each ``(C,)`` float32, of ``x`` viewed as ``(A, C, B)``."""
  out = jax.ShapeDtypeStruct((view.c,), jnp.float32)
  results = jax.ffi.ffi_call("jaxbn_moments", (out, out),
                             vmap_method="broadcast_all")(
                                 x, **_view_attributes(x, view))
  return manual_axes.like_inputs(results, x)


@moments.defjvp
def _moments_jvp(view, primals, tangents):
  (x,), (dx,) = primals, tangents
  mean, m2 = moments(x, view)
  n = view.a * view.b
  dmean = _channel_sum(dx, view) / max(n, 1)
  centered = x.reshape(view).astype(mean.dtype) - _per_channel(mean, view)
  dm2 = 2 * _channel_sum(centered * dx.reshape(view).astype(mean.dtype), view)
  return (mean, m2), (dmean, dm2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def grad_sums(dy: jax.Array, x: jax.Array, mean: jax.Array,
              view: ChannelView) -> tuple[jax.Array, jax.Array]:
  """``(sum dy, sum dy * (x - mean))`` per channel, each ``(C,)`` float32."""
  out = jax.ShapeDtypeStruct((view.c,), jnp.float32)
  results = jax.ffi.ffi_call("jaxbn_grad_sums", (out, out),
                             vmap_method="broadcast_all")(
                                 dy, x, mean.reshape(view.c),
                                 **_view_attributes(x, view))
  return manual_axes.like_inputs(results, dy, x, mean)


@grad_sums.defjvp
def _grad_sums_jvp(view, primals, tangents):
  (dy, x, mean), (ddy, dx, dmean) = primals, tangents
  out = grad_sums(dy, x, mean, view)
  f32 = lambda v: v.reshape(view).astype(jnp.float32)
  centered = f32(x) - _per_channel(mean.reshape(view.c), view)
  d_centered = f32(dx) - _per_channel(dmean.reshape(view.c), view)
  d_sum_dy = _channel_sum(ddy, view)
  d_sum_dy_xc = (_channel_sum(f32(ddy) * centered, view)
                 + _channel_sum(f32(dy) * d_centered, view))
  return out, (d_sum_dy, d_sum_dy_xc)


def last_level_cache_bytes() -> int:
  """The size of CPU 0's last-level cache from sysfs (32 MiB if unknown)."""
  units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
  best_level, size = 0, 32 << 20
  for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
    try:
      with open(os.path.join(index, "level")) as f:
        level = int(f.read())
      with open(os.path.join(index, "size")) as f:
        text = f.read().strip()
    except (OSError, ValueError):
      continue
    value = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    if level > best_level:
      best_level, size = level, value
  return size


@functools.lru_cache(maxsize=None)
def streaming_threshold_bytes() -> int:
  """Outputs from this size on are written with streaming stores.

  A quarter of the last-level cache: measured on a 32 MiB L3, streaming
  stores tie plain ones for a 4 MB input gradient and save 25% from 8 MB on.
  """
  return last_level_cache_bytes() // 4


def input_grad(dy: jax.Array, x: jax.Array, coefficients: jax.Array,
               view: ChannelView, stream: bool | None = None) -> jax.Array:
  """``a * dy + c * x + d`` in float32, in ``x``'s shape and dtype.

  ``coefficients`` is ``(3, C)`` float32: the rows a, c and d. ``stream``
  forces streaming stores on or off (default: by size, see
  :func:`streaming_threshold_bytes`).
  """
  if stream is None:
    stream = x.nbytes >= streaming_threshold_bytes()
  return _input_grad(dy, x, coefficients, view, bool(stream))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _input_grad(dy, x, coefficients, view, stream):
  result = jax.ffi.ffi_call("jaxbn_input_grad",
                            jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")(
                                dy, x, coefficients.reshape(3, view.c),
                                stream=stream, **_view_attributes(x, view))
  return manual_axes.like_inputs((result,), dy, x, coefficients)[0]


@_input_grad.defjvp
def _input_grad_jvp(view, stream, primals, tangents):
  (dy, x, coefficients), (ddy, dx, dcoefficients) = primals, tangents
  out = _input_grad(dy, x, coefficients, view, stream)
  f32 = lambda v: v.reshape(view).astype(jnp.float32)
  a, c, _ = (_per_channel(row, view) for row in coefficients.reshape(3, view.c))
  da, dc, dd = (_per_channel(row, view)
                for row in dcoefficients.reshape(3, view.c))
  tangent = a * f32(ddy) + c * f32(dx) + da * f32(dy) + dc * f32(x) + dd
  return out, tangent.astype(out.dtype).reshape(out.shape)


def backward(dy: jax.Array, x: jax.Array, per_channel: Sequence[jax.Array],
             view: ChannelView, epsilon: float,
             stream: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The whole backward in one call: ``(dx, sum dy, sum dy * (x - mean))``.

  ``per_channel`` is ``(mean, variance, scale, d_mean, d_variance, count)``,
  each ``(C,)`` float32; with ``inv = rsqrt(variance + epsilon)``,
  ``a = scale * inv`` and the sums ``S1``, ``S2``::

    c = 2 (d_variance - scale inv^3 S2 / 2) / count
    d = (d_mean - a S1) / count - c mean        (c = d = 0 where count = 0)
    dx = a dy + c x + d

  (coefficients in float64). ``stream`` as for :func:`input_grad`. Not
  differentiable by itself: ``jaxbn.fused`` gives it the derivative of the
  two-call backward it equals.
  """
  if stream is None:
    stream = x.nbytes >= streaming_threshold_bytes()
  channel = jax.ShapeDtypeStruct((view.c,), jnp.float32)
  per_channel = tuple(v.reshape(view.c) for v in per_channel)
  results = jax.ffi.ffi_call(
      "jaxbn_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), channel, channel),
      vmap_method="broadcast_all")(
          dy, x, *per_channel, stream=bool(stream), epsilon=np.float32(epsilon),
          **_view_attributes(x, view))
  return manual_axes.like_inputs(results, dy, x, *per_channel)
