"""CPU kernels for the fast path's backward and statistics (XLA FFI), and when to use them.

Only ``jaxbn.passes`` calls these bindings: it decides once per traced call
whether a kernel applies and otherwise runs the same math in XLA.

On CPU, XLA runs every reduction as its own pass and evaluates an elementwise
producer inside a reduction (``x - mean``, ``dy * (x - mean)``) at about half
the speed of a plain sum. Two small C++ kernels (``jaxbn/csrc``) read the data
once instead, a third writes the input gradient, a fourth the forward's
output for wide rows, and a fifth runs the whole backward:

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
* ``normalize``: the forward's output pass ``y = (x - mean) a + b`` (and
  its ReLU), for rows of at least ``WIDE_ROW_CHANNELS`` channels only (see
  there); elsewhere the pass stays in XLA, where it fuses with its
  neighbours (an add, a ReLU).
* ``backward``: ``grad_sums``, the coefficients and ``input_grad`` in one
  call (gating dy by a fused ReLU in both passes where the layer has one),
  for a backward with no statistics to combine across devices: the
  second pass then follows the first at once and finds in cache what it left
  there, where XLA's scheduler (breadth-first on CPU) puts other work of the
  same depth between two separate calls.

The statistics are bit-deterministic (a fixed, shape-only split of the work;
partial results merged in order). Each kernel but ``backward`` and
``normalize`` (the closed-form batch norm's forward, under its own VJP)
carries a ``custom_jvp`` written in plain JAX (``jaxbn.passes``
differentiates ``backward`` as the two-call backward it equals), so ``jvp``,
``grad`` and ``grad`` of ``grad`` differentiate through them; ``ffi_call``'s
``broadcast_all`` batching makes ``vmap`` one kernel call.

Every kernel sees ``x`` as ``(A1, G, A, C, B)`` (:class:`ChannelView`): ``G * C``
statistics, reduced over ``A1``, ``A`` and ``B``. A plain batch norm has
``A1 = G = 1`` (channels between reduced ``A`` and ``B``); virtual batches keep
their group axis ``G`` (Keras' strided layout splits the batch as ``(A1, G)``).
A mask reaches them as one weight per row (every index before the channels,
:func:`row_weights`): rows of weight 0 are skipped whatever they hold.

When they run: float32 or bfloat16 data (read as is, accumulated in float32
and float64), no mask or one constant along the channels and the axes after
them, kept axes that are one run of channels in memory, optionally after one
group axis (NHWC, NCHW, (N, C), axis lists of adjacent axes, virtual batches,
any rank), on the CPU backend, and

* ``mode 'auto'`` (default): only when the process sees one device. A custom
  call cannot be partitioned by sharded ``jit``: XLA would all-gather a
  batch-sharded input onto every device. Inputs whose sharding jit knows to
  split a reduced axis always stay in XLA; under ``shard_map`` or ``pmap`` the
  data are local and ``'on'`` is safe and fast.
* ``'on'`` / ``'off'``: always / never.

and never under ``JAXBN_STATISTICS=accelerator`` (``jaxbn.modes``), nor in a
program lowered for ``jax.export`` (see :func:`kernel_or_xla`).

Set the mode with ``JAXBN_CPU_KERNELS=auto|on|off``, :func:`set_mode` (every
thread) or :func:`use` (this thread, inside a block). It is read when a
function is traced and is part of JAX's jit cache key: a jitted function
called under another mode is traced again; an already compiled object keeps
its program. Without a compiled extension (no C++ compiler at install
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
from jax._src import core as jax_src_core
from jax._src import dispatch as jax_dispatch
from jax._src.interpreters import partial_eval as pe
from jax.extend import core as jax_core
from jax.interpreters import batching as jax_batching
from jax.interpreters import mlir

from jaxbn import affine, modes, stats

try:  # built by setup.py when a C++ compiler is present
  from jaxbn import _cpu_kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the install
  _cpu_kernels = None

MODES = modes.KERNEL_MODES


def available() -> bool:
  """Whether the compiled kernels are installed and registered with this
  jaxlib (``NOT_REGISTERED`` says why not, when they are built but not)."""
  return _cpu_kernels is not None


def _check(mode):
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}.")
  if mode != "off" and _SWITCHED_OFF is not None:
    _register_now()


def _register_now():
  """Registers the kernels that ``JAXBN_CPU_KERNELS=off`` left unregistered
  at import, once a mode that may use them is set."""
  global _cpu_kernels, _SWITCHED_OFF, NOT_REGISTERED
  _register(_SWITCHED_OFF)
  _cpu_kernels, _SWITCHED_OFF, NOT_REGISTERED = _SWITCHED_OFF, None, None


def set_mode(mode: str) -> None:
  """``'auto'`` (one device only), ``'on'`` or ``'off'``, for every thread
  that has not set its own with :func:`use`."""
  _check(mode)
  jax.config.update("jaxbn_cpu_kernels", mode)


def get_mode() -> str:
  """The mode functions traced now, in this thread, get."""
  return modes.cpu_kernels.value


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
  """Sets the mode for the functions this thread traces inside the block.

  The mode is part of JAX's jit cache key: a jitted function called inside
  the block is traced again if it was traced under another mode.
  """
  _check(mode)
  with modes.cpu_kernels(mode):
    yield


def _framework_ffi_api():
  """The XLA FFI API version of the running jaxlib, from the header it ships
  (None if absent)."""
  import importlib.util
  import re
  spec = importlib.util.find_spec("jaxlib")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "include", "xla", "ffi", "api", "c_api.h")
    try:
      with open(path) as f:
        text = f.read()
    except OSError:
      continue
    found = [re.search(rf"#define XLA_FFI_API_{part} (\d+)", text)
             for part in ("MAJOR", "MINOR")]
    if all(found):
      return tuple(int(m.group(1)) for m in found)
  return None


def _why_not_registered():
  """None when the built kernels can be registered with this jaxlib, else
  the reason. A handler built against a newer FFI than the running jaxlib's
  makes every JAX computation fail once registered; an older one is fine."""
  import jaxlib
  info = _cpu_kernels.build_info()
  built, running = tuple(info["ffi_api"]), _framework_ffi_api()
  if running is None:
    if info["jaxlib"] == jaxlib.__version__:
      return None
    return (f"they were built with jaxlib {info['jaxlib']} and this jaxlib "
            f"{jaxlib.__version__} does not say which XLA FFI it provides")
  if built[0] != running[0] or built[1] > running[1]:
    return (f"they were built against XLA FFI API {built[0]}.{built[1]} "
            f"(jaxlib {info['jaxlib']}), and this jaxlib {jaxlib.__version__} "
            f"provides {running[0]}.{running[1]}")
  return None


def _register(built) -> None:
  for name, handler in built.handlers().items():
    jax.ffi.register_ffi_target(name, handler, platform="cpu")


NOT_REGISTERED = None  # why the built kernels are not in use, if they are not
_SWITCHED_OFF = None  # the built kernels, left unregistered by the environment
if _cpu_kernels is not None:
  if os.environ.get("JAXBN_CPU_KERNELS") == "off":
    NOT_REGISTERED = "JAXBN_CPU_KERNELS=off"
    _SWITCHED_OFF = _cpu_kernels if _why_not_registered() is None else None
  else:
    NOT_REGISTERED = _why_not_registered()
  if NOT_REGISTERED is None:
    _register(_cpu_kernels)
  elif NOT_REGISTERED != "JAXBN_CPU_KERNELS=off":
    import warnings
    warnings.warn(
        f"jaxbn's CPU kernels are not registered: {NOT_REGISTERED}; jaxbn runs "
        "in XLA (same numbers, slower on CPU). Rebuild them against this "
        "jaxlib: pip install 'setuptools>=77' && pip install "
        "--no-build-isolation --force-reinstall --no-deps <jaxbn source or "
        "sdist>.", RuntimeWarning, stacklevel=2)
  if NOT_REGISTERED is not None:
    _cpu_kernels = None


# ------------------------------------------------------- calls, export-safe
#
# Each kernel call is one ``jaxbn_kernel_call`` primitive. Its lowering emits
# the FFI call, except in a program lowered for ``jax.export``: there it
# lowers the same operation in plain XLA (``fallback``), so that an exported
# program needs no jaxbn and passes export's custom-call check. Derivatives
# never reach the primitive (each kernel has a ``custom_jvp`` above it);
# ``vmap`` moves batch axes to the front, which the kernels treat as more
# independent problems (``broadcast_all``).

_kernel_call_p = jax_core.Primitive("jaxbn_kernel_call")
_kernel_call_p.multiple_results = True
_kernel_call_p.def_impl(
    functools.partial(jax_dispatch.apply_primitive, _kernel_call_p))


def _kernel_call_abstract_eval(*avals, target, results, fallback, attributes):
  del target, fallback, attributes
  vma = frozenset().union(*(getattr(a, "vma", frozenset()) for a in avals))
  return [jax.core.ShapedArray(r.shape, r.dtype, vma=vma) if vma else
          jax.core.ShapedArray(r.shape, r.dtype) for r in results]


_kernel_call_p.def_abstract_eval(_kernel_call_abstract_eval)


def _kernel_call_lowering(ctx, *args, target, results, fallback, attributes):
  del results
  if ctx.module_context.lowering_parameters.for_export:
    return mlir.lower_fun(fallback, multiple_results=True)(ctx, *args)
  return jax.ffi.ffi_lowering(target)(ctx, *args, **dict(attributes))


mlir.register_lowering(_kernel_call_p, _kernel_call_lowering)


def _kernel_call_batching(args, dims, *, target, results, fallback,
                          attributes):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [jnp.moveaxis(a, d, 0) if d is not None else
          jnp.broadcast_to(a, (size,) + a.shape) for a, d in zip(args, dims)]
  results = tuple(jax.ShapeDtypeStruct((size,) + r.shape, r.dtype)
                  for r in results)
  outs = _kernel_call_p.bind(*args, target=target, results=results,
                             fallback=jax.vmap(fallback),
                             attributes=attributes)
  return outs, [0] * len(outs)


jax_batching.primitive_batchers[_kernel_call_p] = _kernel_call_batching


def _kernel_call_dce(used_outputs, eqn):
  """Dead-code elimination of a kernel call (``jax.jit`` runs it before
  lowering). A call none of whose results is used goes; the one-call
  backward whose input gradient is unused (gradients with respect to the
  parameters alone, as for a batch norm on the network's input) becomes
  the same call without the input gradient's pass: its ``dx`` a one-element
  placeholder the kernel does not write."""
  params = eqn.params
  if not any(used_outputs):
    return [False] * len(eqn.invars), None
  if params["target"] != "jaxbn_backward" or used_outputs[0]:
    return [True] * len(eqn.invars), eqn
  dx, *sums = params["results"]
  placeholder = jax.ShapeDtypeStruct((1,), dx.dtype)
  fallback = params["fallback"]

  def sums_only(*args):
    return (jnp.zeros(placeholder.shape, placeholder.dtype),
            *fallback(*args)[1:])

  attributes = dict(params["attributes"], input_grad=False)
  new_params = dict(params, results=(placeholder, *sums), fallback=sums_only,
                    attributes=tuple(sorted(attributes.items())))
  dropped = jax_src_core.DropVar(eqn.outvars[0].aval.update(
      shape=placeholder.shape))
  return [True] * len(eqn.invars), eqn.replace(
      params=new_params, outvars=[dropped, *eqn.outvars[1:]])


pe.dce_rules[_kernel_call_p] = _kernel_call_dce


def _call(target, results, fallback, *args, **attributes):
  """The kernel ``target`` on ``args`` (``results``: ShapeDtypeStructs);
  ``fallback(*args)`` computes the same in XLA for exported programs."""
  return tuple(_kernel_call_p.bind(
      *args, target=target, results=tuple(results), fallback=fallback,
      attributes=tuple(sorted(attributes.items()))))


class ChannelView(NamedTuple):
  """``x`` seen as ``(A1, G, A, C, B)``: ``G * C`` statistics, reduced over
  ``A1``, ``A`` and ``B``.

  ``A1 = G = 1`` for a plain batch norm (channels ``C`` between reduced ``A``
  and ``B``); a view of virtual batches keeps the group axis ``G`` too
  (Keras' strided layout ``(v, B/v, ..., C)``: ``A1 = v``).
  """

  a1: int
  g: int
  a: int
  c: int
  b: int

  @property
  def channels(self) -> int:
    """Statistics per call: one per (group, channel)."""
    return self.g * self.c

  @property
  def shape(self) -> tuple:
    return tuple(self)


def _channel_run(shape, reduction_axes, split=False):
  """``(group axis or None, first, last + 1)`` of the kept axes: one run of
  channels, optionally after one separate group axis (``split``: the first
  kept axis is the group axis even when the next one follows it); None
  otherwise."""
  kept = [i for i in range(len(shape)) if i not in set(reduction_axes)]
  if not kept:
    return None
  first, group = kept[0], None
  if kept[1:] and (split or kept[1] != first + 1):  # a group, then channels
    group, first = kept[0], kept[1]
    kept = kept[1:]
  if kept != list(range(first, kept[-1] + 1)):
    return None
  return group, first, kept[-1] + 1


def channel_view(shape: Sequence[int], reduction_axes: Sequence[int],
                 split: bool = False) -> ChannelView | None:
  """The view, or None when the kept axes are not one contiguous run of
  channels, optionally preceded by one separate group axis (always taken
  as one with ``split``)."""
  run = _channel_run(shape, reduction_axes, split)
  if run is None:
    return None
  group, first, last = run
  if group is None:
    a1, g, a = 1, 1, math.prod(shape[:first])
  else:
    a1, g, a = (math.prod(shape[:group]), shape[group],
                math.prod(shape[group + 1:first]))
  return ChannelView(a1, g, a, math.prod(shape[first:last]),
                     math.prod(shape[last:]))


INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def row_weights(weights, shape, view: ChannelView):
  """A mask as the kernels take it in ``view``: one float32 per row (every
  index of the axes before the view's channels), or None when it varies
  over the channels or the axes after them (it then stays in XLA)."""
  first = len(shape)
  while first > 0 and math.prod(shape[first - 1:]) <= view.c * view.b and (
      math.prod(shape[:first - 1]) >= view.a1 * view.g * view.a):
    first -= 1
  if math.prod(shape[first:]) != view.c * view.b:
    return None
  w = jnp.asarray(weights)
  w = w.reshape((1,) * (len(shape) - w.ndim) + w.shape)
  if any(size != 1 for size in w.shape[first:]):
    return None
  rows = w.reshape(w.shape[:first])
  return jnp.broadcast_to(rows, tuple(shape[:first])).reshape(-1).astype(
      jnp.float32)


def applicable(x: jax.Array, reduction_axes: Sequence[int], weights=None,
               dy: jax.Array | None = None,
               per_channel: jax.Array | None = None) -> ChannelView | None:
  """The view to run the kernels on, or None to stay in XLA.

  ``x`` (and ``dy``, of the same dtype) float32 or bfloat16, ``per_channel``
  values (a mean, coefficients) float32, weights (a mask) constant along
  the channels and the axes after them (see :func:`row_weights`).
  """
  mode = modes.cpu_kernels.value
  if (mode == "off" or _cpu_kernels is None
      or modes.statistics.value == "accelerator"):
    return None
  if mode == "auto" and jax.device_count() != 1:
    return None
  if jnp.dtype(x.dtype) not in INPUT_DTYPES:
    return None
  if dy is not None and dy.dtype != x.dtype:
    return None
  if per_channel is not None and jnp.dtype(per_channel.dtype) != jnp.float32:
    return None
  if modes.sharded_along(x, reduction_axes):  # would gather x
    return None
  view = channel_view(x.shape, reduction_axes)
  if view is None or weights is None or row_weights(weights, x.shape, view) \
      is not None:
    return view
  # a mask varying over the first kept axis (virtual batches): that axis as
  # the group axis
  view = channel_view(x.shape, reduction_axes, split=True)
  if view is None or row_weights(weights, x.shape, view) is None:
    return None
  return view


def _view_attributes(x, view: ChannelView):
  # x goes to the kernel in its own shape: XLA:CPU copies a bfloat16 operand
  # to reshape it, even where the reshape is free for float32.
  return dict(rank=np.int64(x.ndim), **{
      name: np.int64(size) for name, size in zip(ChannelView._fields, view)})


def _in_view(value, view: ChannelView):
  return value.reshape(view.shape).astype(jnp.float32)


def _channel_sum(value, view: ChannelView):
  return jnp.sum(_in_view(value, view), axis=(0, 2, 4)).reshape(view.channels)


def _per_channel(vector, view: ChannelView):
  return vector.reshape(1, view.g, 1, view.c, 1)


def _operand_per_channel(operand, view: ChannelView):
  """Each of the ``n`` per-channel vectors of an ``(n, G * C)`` operand,
  shaped to broadcast against ``x`` in the view."""
  return tuple(_per_channel(values, view) for values in
               operand.reshape(operand.shape[0], view.channels))


def _per_problem(operand, view: ChannelView):
  """An ``(n, G * C)`` per-channel operand as the kernels take it: ``(G, n,
  C)``, the n vectors of each problem together."""
  return jnp.swapaxes(operand.reshape(operand.shape[0], view.g, view.c), 0, 1)


def _per_row(rows, view: ChannelView):
  return rows.reshape(view.a1, view.g, view.a, 1, 1)


def _weights_operand(rows):
  """The kernels' row-weights operand and ``masked`` flag (a one-element
  placeholder without a mask)."""
  if rows is None:
    return jnp.ones((1,), jnp.float32), False
  return rows, True


def moments(x: jax.Array, view: ChannelView,
            rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(mean, M2)``, each ``(G * C,)`` float32, of ``x`` in ``view``.

  ``rows``: optional row weights (:func:`row_weights`); rows of weight 0 are
  skipped whatever they hold (a NaN in padding stays out).
  """
  return _moments(x, _weights_operand(rows)[0], view, rows is not None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _moments(x, rows, view, masked):
  out = jax.ShapeDtypeStruct((view.channels,), jnp.float32)
  results = _call("jaxbn_moments", (out, out),
                  functools.partial(_xla_moments, view=view, masked=masked),
                  x, rows, masked=masked, **_view_attributes(x, view))
  return modes.like_inputs(results, x, rows)


@_moments.defjvp
def _moments_jvp(view, masked, primals, tangents):
  (x, rows), (dx, _) = primals, tangents
  mean, m2 = _moments(x, rows, view, masked)
  w = _per_row(rows, view) if masked else jnp.ones((), jnp.float32)
  n = _channel_sum(jnp.broadcast_to(w, view.shape), view)
  counted = lambda v: jnp.where(w > 0, w * v, 0)
  dmean = jnp.where(n > 0, _channel_sum(counted(_in_view(dx, view)), view)
                    / jnp.where(n > 0, n, 1), 0)
  centered = _in_view(x, view) - _per_channel(mean, view)
  dm2 = 2 * _channel_sum(counted(centered * _in_view(dx, view)), view)
  return (mean, m2), (dmean, dm2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def grad_sums(dy: jax.Array, x: jax.Array, mean: jax.Array,
              view: ChannelView) -> tuple[jax.Array, jax.Array]:
  """``(sum dy, sum dy * (x - mean))``, each ``(G * C,)`` float32."""
  out = jax.ShapeDtypeStruct((view.channels,), jnp.float32)
  results = _call("jaxbn_grad_sums", (out, out),
                  functools.partial(_xla_grad_sums, view=view),
                  dy, x, mean.reshape(view.channels),
                  **_view_attributes(x, view))
  return modes.like_inputs(results, dy, x, mean)


@grad_sums.defjvp
def _grad_sums_jvp(view, primals, tangents):
  (dy, x, mean), (ddy, dx, dmean) = primals, tangents
  out = grad_sums(dy, x, mean, view)
  f32 = lambda v: _in_view(v, view)
  centered = f32(x) - _per_channel(mean, view)
  d_centered = f32(dx) - _per_channel(dmean, view)
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

  A quarter of the last-level cache: a smaller output may still be in the
  cache when it is read, a larger one gains from skipping the read of each
  line before its write (figures in CHANGELOG).
  """
  return last_level_cache_bytes() // 4


def input_grad(dy: jax.Array, x: jax.Array, coefficients: jax.Array,
               view: ChannelView, stream: bool | None = None,
               rows: jax.Array | None = None) -> jax.Array:
  """``a * dy + w * (c * (x - m) + d)`` in float32, in ``x``'s shape and
  dtype.

  ``w``: the row weights ``rows`` (1 without them); a row of weight 0 is
  padding and gets 0, whatever its dy and x hold.

  ``coefficients`` is ``(4, G * C)`` float32: the rows a, c, d and the mean
  m (centred on it, as the forward: ``c x + (d - c m)`` would cancel where
  ``|m| >> std``). ``stream``
  forces streaming stores on or off (default: by size, see
  :func:`streaming_threshold_bytes`).
  """
  if stream is None:
    stream = x.nbytes >= streaming_threshold_bytes()
  operand, masked = _weights_operand(rows)
  return _input_grad(dy, x, coefficients, operand, view, bool(stream), masked)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _input_grad(dy, x, coefficients, rows, view, stream, masked):
  per_problem = _per_problem(coefficients, view)
  (result,) = _call("jaxbn_input_grad",
                     (jax.ShapeDtypeStruct(x.shape, x.dtype),),
                     functools.partial(_xla_input_grad, view=view,
                                       masked=masked),
                     dy, x, per_problem, rows, stream=stream, masked=masked,
                     **_view_attributes(x, view))
  return modes.like_inputs((result,), dy, x, coefficients, rows)[0]


@_input_grad.defjvp
def _input_grad_jvp(view, stream, masked, primals, tangents):
  (dy, x, coefficients, rows), (ddy, dx, dcoefficients, _) = primals, tangents
  out = _input_grad(dy, x, coefficients, rows, view, stream, masked)
  f32 = lambda v: _in_view(v, view)
  w = _per_row(rows, view) if masked else jnp.ones((), jnp.float32)
  a, c, _, m = _operand_per_channel(coefficients, view)
  da, dc, dd, dm = _operand_per_channel(dcoefficients, view)
  tangent = jnp.where(w > 0, a * f32(ddy) + da * f32(dy)
                      + w * (c * (f32(dx) - dm) + dc * (f32(x) - m) + dd), 0)
  return out, tangent.astype(out.dtype).reshape(out.shape)


# From this many channels in a row (channels last) the forward's output
# pass runs in the kernel. XLA fuses the arithmetic of y's per-channel
# coefficients into its pass and reads, per element, every vector they come
# from (seven: 100 KB a row at 3584 channels, far past L1), which the
# kernel does not (figures in CHANGELOG). Narrower rows keep XLA's
# pass, which fuses with its neighbours: the residual add after the
# 2048-channel layers of ResNets would take a pass of its own after a kernel.
WIDE_ROW_CHANNELS = 3072


def normalize(x: jax.Array, view: ChannelView, terms: jax.Array, relu: bool,
              stream: bool | None = None) -> jax.Array:
  """``(x * u - m) * a + b`` per channel in float32, then ``max(., 0)`` with
  ``relu``, in ``x``'s shape and dtype: ``affine.normalize``, each step
  rounded once (XLA:CPU may fuse the last multiply-add into one FMA: the two
  then differ by an ulp; the backward's ReLU gate computes z as this does).

  ``terms`` is ``(4, G * C)`` float32: the rows u (``1 / unit``), m (the mean
  in units), a and b. ``stream`` as for :func:`input_grad`.
  """
  if stream is None:
    stream = x.nbytes >= streaming_threshold_bytes()
  return _normalize(x, terms, view, bool(relu), bool(stream))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _normalize(x, terms, view, relu, stream):
  per_problem = _per_problem(terms, view)
  (y,) = _call("jaxbn_normalize", (jax.ShapeDtypeStruct(x.shape, x.dtype),),
               functools.partial(_xla_normalize, view=view, relu=relu),
               x, per_problem, stream=stream, relu=relu,
               **_view_attributes(x, view))
  return modes.like_inputs((y,), x, terms)[0]


@_normalize.defjvp
def _normalize_jvp(view, relu, stream, primals, tangents):
  # the closed-form batch norm's forward is differentiated by grad of grad
  (x, terms), (dx, dterms) = primals, tangents
  y = _normalize(x, terms, view, relu, stream)
  u, m, a, b = _operand_per_channel(terms, view)
  du, dm, da, db = _operand_per_channel(dterms, view)
  t = _in_view(x, view) * u - m
  tangent = (_in_view(dx, view) * u + _in_view(x, view) * du - dm) * a \
      + t * da + db
  if relu:  # jax.nn.relu's rule: the tangent where the output is > 0
    tangent = jnp.where(t * a + b > 0, tangent, 0)
  return y, tangent.astype(y.dtype).reshape(y.shape)


def backward(dy: jax.Array, x: jax.Array, per_channel: Sequence[jax.Array],
             view: ChannelView, epsilon: float, stream: bool | None = None,
             rows: jax.Array | None = None,
             relu: Sequence[jax.Array] | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The whole backward in one call: ``(dx, sum dy, sum dy * (x - mean))``.

  ``per_channel`` is ``(mean, variance, scale, d_mean, d_variance, count)``
  (``passes.BackwardTerms``' order), each ``(G * C,)`` float32, optionally
  followed by ``inv_unit`` (None: no units). From the sums ``S1 = sum dy``
  and ``S2 = sum dy (x - mean)``, the coefficients of
  ``affine.backward_coefficients`` and::

    dx = a dy + w (c (x - mean) + d)

  (coefficients in float64; ``w`` the row weights ``rows``, as for
  :func:`input_grad`, whose ``stream`` this takes too; rows of weight 0 are
  padding: left out of the sums, dx = 0). ``relu``: None, or a fused
  ReLU's ``(a, b)``, each ``(G * C,)`` float32: dy is first gated to 0 where
  ``(x - mean) a + b <= 0``, in both passes. ``inv_unit``, where given: per
  channel ``u = 1 / unit`` (``stats.in_units``, a power of two): the
  backward of ``x u``, whose per-channel operands these are (epsilon
  becomes ``epsilon u^2``), with dx ``u`` times its gradient (where a unit
  is not 1 the kernel runs plain loops: such data are rare). Not
  differentiable by itself: ``jaxbn.passes`` gives it the derivative of the
  two-call backward it equals.
  """
  per_channel, inv_unit = tuple(per_channel[:6]), (*per_channel[6:], None)[0]
  if stream is None:
    stream = x.nbytes >= streaming_threshold_bytes()
  channel = jax.ShapeDtypeStruct((view.channels,), jnp.float32)
  per_channel = tuple(v.reshape(view.channels) for v in per_channel)
  operand, masked = _weights_operand(rows)
  gate = ((jnp.zeros((1,), jnp.float32),) * 2 if relu is None else
          tuple(v.reshape(view.channels) for v in relu))
  units = inv_unit is not None
  unit = (inv_unit.reshape(view.channels).astype(jnp.float32) if units
          else jnp.ones((1,), jnp.float32))
  results = _call(
      "jaxbn_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), channel, channel),
      functools.partial(_xla_backward, view=view, masked=masked,
                        epsilon=epsilon, relu=relu is not None, units=units),
      dy, x, *per_channel, unit, operand, *gate, stream=bool(stream),
      epsilon=np.float32(epsilon), masked=masked, relu=relu is not None,
      units=units, input_grad=True, **_view_attributes(x, view))
  return modes.like_inputs(results, dy, x, *per_channel, unit, operand,
                                 *gate)


# ------------------------------------------------- the kernels, in plain XLA
#
# What each kernel computes, for exported programs (see ``_call``): one
# problem's inputs in their own shape (under vmap the batching rule vmaps the
# fallback), the view as in the kernels.


def _xla_moments(x, rows, *, view, masked):
  # the XLA path's corrected two-pass statistics (stats.local_moments), not
  # a plain two-pass: an exported program keeps the live one's accuracy
  # (at mean 1e6, std 1 a plain float32 two-pass is 1.8e-3 off)
  triple = stats.local_moments(x.reshape(view.shape), (0, 2, 4),
                               _per_row(rows, view) if masked else None)
  return triple.mean.reshape(view.channels), triple.m2.reshape(view.channels)


def _xla_grad_sums(dy, x, mean, w=None, *, view):
  dyv, xv = _in_view(dy, view), _in_view(x, view)
  centered = xv - _per_channel(mean, view)
  return (_channel_sum(stats.where_valid(w, dyv), view),
          _channel_sum(stats.where_valid(w, dyv * centered), view))


def _xla_input_grad(dy, x, per_problem, rows, *, view, masked):
  coefficients = tuple(_per_channel(per_problem[:, i], view)
                       for i in range(4))
  dx = affine.input_gradient(_in_view(dy, view), _in_view(x, view),
                             _per_row(rows, view) if masked else None,
                             coefficients)
  return (dx.astype(x.dtype).reshape(x.shape),)


def _xla_normalize(x, per_problem, *, view, relu):
  # the terms (u, mean in units, a, b): the normalization of x u
  u, m, a, b = (_per_channel(per_problem[:, i], view) for i in range(4))
  y = affine.normalize(_in_view(x, view) * u, m, a, b,
                       "relu" if relu else None)
  return (y.astype(x.dtype).reshape(x.shape),)


def _xla_backward(dy, x, *operands, view, masked, epsilon, relu, units):
  # the kernel's operands after dy and x, in its order
  (mean, var, scale, d_mean, d_var, count, unit, rows, relu_a,
   relu_b) = operands
  dtype = x.dtype
  if units:  # the backward of x u, dx times u (see backward)
    x = (_in_view(x, view) * _per_channel(unit, view)).reshape(x.shape)
    epsilon = affine.epsilon_in_units(epsilon, unit)
  if relu:
    gated = affine.relu_gate(
        _in_view(dy, view), _in_view(x, view),
        *(_per_channel(v, view) for v in (mean, relu_a, relu_b)))
    dy = gated.astype(dy.dtype).reshape(dy.shape)
  sum_dy, sum_dy_xc = _xla_grad_sums(
      dy, x, mean, _per_row(rows, view) if masked else None, view=view)
  a, c, d = affine.backward_coefficients(scale, var, epsilon, (d_mean, d_var),
                                         (sum_dy, sum_dy_xc), count)
  per_problem = jnp.stack([v.reshape(view.g, view.c)
                           for v in (a, c, d, mean)], axis=1)
  (dx,) = _xla_input_grad(dy, x, per_problem, rows, view=view, masked=masked)
  if units:
    dx = (_in_view(dx, view) * _per_channel(unit, view)).reshape(dx.shape)
  return dx.astype(dtype), sum_dy, sum_dy_xc
