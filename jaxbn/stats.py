"""Batch statistics: masked two-pass moments and their exact cross-device merge.

For weights ``w`` (a mask, 1 where an element counts) over reduction axes::

  n    = sum w
  mean = sum(w * x) / n
  M2   = sum(w * (x - mean)^2)          (two-pass: no E[x^2] - E[x]^2 cancellation)
  var  = M2 / n                         (biased; 0 when n == 0)

Across devices, each device's ``(n_i, mean_i, M2_i)`` is merged with Chan's
formula, which stays exact for data with a large mean::

  n = sum n_i,  mean = sum n_i mean_i / n,  M2 = sum M2_i + sum n_i (mean_i - mean)^2

The triples travel in **one** all-reduce: each device writes its triple into its
own slot of a zero buffer ``(devices, 3, ...)`` and the buffer is ``psum``-ed
(an all-gather expressed as a sum, so the compiled program holds exactly one
all-reduce of ``3 * devices * channels`` floats).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import cpu_kernels, manual_axes


class Moments(NamedTuple):
  """Per-channel statistics, each with the input's rank (reduced axes = 1)."""

  mean: jax.Array
  variance: jax.Array
  count: jax.Array


def stat_dtype(dtype) -> jnp.dtype:
  """float32 statistics for 16-bit inputs; wider inputs keep their dtype."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, 0 where ``den == 0`` (an empty or fully masked channel)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def reduce_count(shape: Sequence[int], reduction_axes: Sequence[int],
                 weights: jax.Array | None, dtype) -> jax.Array:
  """Number of valid elements per channel (keepdims)."""
  if weights is None:
    n = 1
    for a in reduction_axes:
      n *= shape[a]
    kept = tuple(1 if i in reduction_axes else s for i, s in enumerate(shape))
    return jnp.full(kept, n, dtype)
  w = jnp.broadcast_to(weights.astype(dtype), shape)
  return jnp.sum(w, axis=tuple(reduction_axes), keepdims=True)


def separate(*values):
  """Distinct copies of ``values`` that XLA may not merge (CSE) again.

  XLA:CPU does not fuse two reductions that read one producer; it writes the
  shared producer (``x - mean``, a float32 copy of a bf16 ``x``) to memory in
  full. Handing each reduction its own copy of its inputs keeps every
  elementwise producer inside the reduction that reads it. The barrier is
  differentiable and costs nothing at run time.
  """
  return lax.optimization_barrier(values)


def _sum(x, axes):
  return jnp.sum(x, axis=axes, keepdims=True)


def local_moments(x: jax.Array, reduction_axes: Sequence[int],
                  weights: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(count, mean, M2)`` of one device's data: two passes, keepdims.

  ``x`` may be 16-bit; the arithmetic is in ``stat_dtype(x.dtype)``.
  """
  axes = tuple(reduction_axes)
  sd = stat_dtype(x.dtype)
  x_for_mean, x_for_m2 = separate(x, x)
  count = reduce_count(x.shape, axes, weights, sd)
  xs = x_for_mean.astype(sd)
  w = None if weights is None else weights.astype(sd)
  if w is None:
    mean = _sum(xs, axes) / count
  else:
    mean = safe_divide(_sum(w * xs, axes), count)
  squares = jnp.square(x_for_m2.astype(sd) - separate(mean)[0])
  m2 = _sum(squares if w is None else w * squares, axes)
  return jnp.broadcast_to(count, mean.shape), mean, m2


def local_moments_shifted(x: jax.Array, reduction_axes: Sequence[int],
                          weights: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(count, mean, M2)`` from one pass of shifted sums (for GPU/TPU).

  With a per-channel shift ``s`` taken from the data (the first element),
  ``S1 = sum w (x - s)`` and ``S2 = sum w (x - s)^2`` are sibling reductions
  of one read, which XLA:GPU fuses; ``M2 = S2 - S1^2 / n`` loses only
  ``(mean - s)^2 / var`` ulps, small because ``s`` is a sample of the data.
  """
  axes = tuple(reduction_axes)
  if manual_axes.sharded_along(x, axes):  # no x[0] to shift by: two passes
    return local_moments(x, axes, weights)
  sd = stat_dtype(x.dtype)
  count = reduce_count(x.shape, axes, weights, sd)
  shift = x.astype(sd)
  for axis in axes:
    if shift.shape[axis] == 0:  # an empty batch: nothing to shift by
      shift = jnp.zeros(shift.shape[:axis] + (1,) + shift.shape[axis + 1:], sd)
    else:
      shift = lax.slice_in_dim(shift, 0, 1, axis=axis)
  shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))
  centered = x.astype(sd) - shift
  w = None if weights is None else weights.astype(sd)
  s1 = _sum(centered if w is None else w * centered, axes)
  squares = jnp.square(centered)
  s2 = _sum(squares if w is None else w * squares, axes)
  mean_shifted = safe_divide(s1, count)
  m2 = jnp.maximum(s2 - s1 * mean_shifted, 0)
  return jnp.broadcast_to(count, s1.shape), shift + mean_shifted, m2


def kernel_moments(x, reduction_axes, view):
  """``(count, mean, M2)`` (keepdims) from the one-read CPU kernel."""
  kept = tuple(1 if i in reduction_axes else s for i, s in enumerate(x.shape))
  mean, m2 = cpu_kernels.moments(x, view)
  count = jnp.full(kept, view.a * view.b, mean.dtype)
  return count, mean.reshape(kept), m2.reshape(kept)


def platform_moments(x, reduction_axes, weights=None):
  """One-read kernel or two XLA passes on CPU, shifted sums elsewhere.

  XLA:CPU has no sibling fusion, so its two-pass moments cost two reads; the
  CPU kernel (float32 or bfloat16, unmasked, see ``jaxbn.cpu_kernels``)
  costs one.
  """
  axes = tuple(reduction_axes)
  view = cpu_kernels.applicable(x, axes, weights)
  if view is None:
    cpu = lambda: local_moments(x, axes, weights)
  else:
    cpu = lambda: kernel_moments(x, axes, view)
  return lax.platform_dependent(
      cpu=cpu, default=lambda: local_moments_shifted(x, axes, weights))


def device_slot(axis_name, axis_index_groups) -> tuple[jax.Array, int]:
  """This device's position in its group and the group size."""
  index = lax.axis_index(axis_name)
  if axis_index_groups is None:
    return index, lax.psum(1, axis_name)
  groups = [list(g) for g in axis_index_groups]
  size = len(groups[0])
  table = [0] * sum(len(g) for g in groups)
  for group in groups:
    if len(group) != size:
      raise ValueError(
          f"`axis_index_groups` must have groups of equal size; got "
          f"{axis_index_groups!r}.")
    for pos, device in enumerate(group):
      table[device] = pos
  return jnp.asarray(table, jnp.int32)[index], size


def merge_across_devices(count, mean, m2, axis_name, axis_index_groups=None):
  """Chan's merge of per-device ``(count, mean, M2)`` in one all-reduce."""
  slot, size = device_slot(axis_name, axis_index_groups)
  packed = jnp.stack([count, mean, m2])
  buffer = jnp.zeros((size,) + packed.shape, packed.dtype)
  buffer = lax.dynamic_update_index_in_dim(buffer, packed, slot, 0)
  everyone = lax.psum(buffer, axis_name, axis_index_groups=axis_index_groups)
  counts, means, m2s = everyone[:, 0], everyone[:, 1], everyone[:, 2]
  total = jnp.sum(counts, axis=0)
  mean = safe_divide(jnp.sum(counts * means, axis=0), total)
  m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - mean),
                                      axis=0)
  return total, mean, m2


def moments(x: jax.Array, reduction_axes: Sequence[int], *,
            weights: jax.Array | None = None, axis_name=None,
            axis_index_groups=None) -> Moments:
  """Mean and biased variance over ``reduction_axes`` (and devices).

  Args:
    x: data, already in the statistics dtype.
    reduction_axes: axes to reduce.
    weights: optional 0/1 (or non-negative) weights broadcastable to ``x``.
    axis_name: optional named axis (or tuple) to combine devices over.
    axis_index_groups: optional device groups for ``axis_name``.
  """
  count, mean, m2 = platform_moments(x, reduction_axes, weights)
  if axis_name is not None:
    count, mean, m2 = merge_across_devices(count, mean, m2, axis_name,
                                           axis_index_groups)
  return Moments(mean, safe_divide(m2, count), count)


def bessel_factor(count: jax.Array) -> jax.Array:
  """``n / (n - 1)``, with 1 for ``n <= 1`` (no division by zero)."""
  return jnp.where(count > 1, count / jnp.maximum(count - 1, 1), 1.0)
