"""Batch statistics: masked two-pass moments and their exact cross-device merge.

For weights ``w`` (a mask, 1 where an element counts) over reduction axes::

  n    = sum w
  mean = sum(w * x) / n
  M2   = sum(w * (x - mean)^2)          (two-pass: no E[x^2] - E[x]^2 cancellation)
  var  = M2 / n                         (biased; 0 when n == 0)

Across devices, each device's ``(n_i, mean_i, M2_i)`` is merged with Chan's
formula, which stays exact for data with a large mean::

  n = sum n_i,  mean = sum n_i mean_i / n,  M2 = sum M2_i + sum n_i (mean_i - mean)^2

(:func:`merge`, the one merge of triples in jaxbn: devices, virtual batches
and Precise BN use it). The triples travel in **one** all-reduce: each device writes its triple into its
own slot of a zero buffer ``(devices, 3, ...)`` and the buffer is ``psum``-ed
(an all-gather expressed as a sum, so the compiled program holds exactly one
all-reduce of ``3 * devices * channels`` floats).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import manual_axes


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
  """Number of valid elements per channel (keepdims).

  From the weights as given (broadcastable to ``shape``): an axis the weights
  do not vary over multiplies the count by its size instead of being summed.
  """
  kept = tuple(1 if i in reduction_axes else s for i, s in enumerate(shape))
  if weights is None:
    return jnp.full(kept, math.prod(shape[a] for a in reduction_axes), dtype)
  w = jnp.asarray(weights).astype(dtype)
  w = w.reshape((1,) * (len(shape) - w.ndim) + w.shape)
  summed = tuple(a for a in reduction_axes if w.shape[a] != 1)
  repeats = math.prod(shape[a] for a in reduction_axes if w.shape[a] == 1)
  count = jnp.sum(w, axis=summed, keepdims=True) if summed else w
  return jnp.broadcast_to(count * repeats, kept)


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


def _weighted(w, values):
  """``w * values``, 0 where ``w == 0`` whatever ``values`` holds there (a NaN
  in masked-out padding stays out)."""
  if w is None:
    return values
  return jnp.where(w != 0, w * values, 0)


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
  mean = safe_divide(_sum(_weighted(w, xs), axes), count)
  squares = jnp.square(x_for_m2.astype(sd) - separate(mean)[0])
  m2 = _sum(_weighted(w, squares), axes)
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
  s1 = _sum(_weighted(w, centered), axes)
  s2 = _sum(_weighted(w, jnp.square(centered)), axes)
  mean_shifted = safe_divide(s1, count)
  m2 = jnp.maximum(s2 - s1 * mean_shifted, 0)
  return jnp.broadcast_to(count, s1.shape), shift + mean_shifted, m2


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


def merge(count, mean, m2, axis: int, *, between: bool = True,
          pooled: tuple = ()):
  """``(count, mean, M2, *pooled sums)`` of the groups stacked along ``axis``.

  Chan's formula: ``n = sum n_i``, ``mean = sum n_i mean_i / n`` and
  ``M2 = sum M2_i + sum n_i (mean_i - mean)^2``. With ``between=False`` the
  second term is left out: ``M2 / n`` is then the count-weighted average of
  the groups' variances, which is what Keras' virtual batches average.
  ``pooled`` values are summed along. Written with array methods only, so
  NumPy float64 arrays stay NumPy (Precise BN) and JAX arrays stay JAX.
  Empty groups count for nothing.
  """
  total = count.sum(axis, keepdims=True)
  merged_mean = (count * mean).sum(axis, keepdims=True) / (total + (total == 0))
  merged_m2 = m2.sum(axis, keepdims=True)
  if between:
    merged_m2 = merged_m2 + (count * (mean - merged_mean) ** 2).sum(
        axis, keepdims=True)
  merged = (total, merged_mean, merged_m2) + tuple(
      v.sum(axis, keepdims=True) for v in pooled)
  return tuple(v.squeeze(axis) for v in merged)


def merge_across_devices(count, mean, m2, axis_name, axis_index_groups=None, *,
                         between: bool = True, pooled: tuple = ()):
  """:func:`merge` of every device's ``(count, mean, M2)``, in one all-reduce.

  Each device writes its values into its own slot of a zero buffer and the
  buffer is summed (an all-gather as one psum). With ``between=False`` the
  sums ``(n, n mean, M2, *pooled)`` are all a device needs to send.
  """
  if not between:
    sums = lax.psum(jnp.stack([count, count * mean, m2, *pooled]), axis_name,
                    axis_index_groups=axis_index_groups)
    return (sums[0], safe_divide(sums[1], sums[0]), sums[2], *sums[3:])
  slot, size = device_slot(axis_name, axis_index_groups)
  packed = jnp.stack([count, mean, m2, *pooled])
  buffer = jnp.zeros((size,) + packed.shape, packed.dtype)
  buffer = lax.dynamic_update_index_in_dim(buffer, packed, slot, 0)
  everyone = lax.psum(buffer, axis_name, axis_index_groups=axis_index_groups)
  return merge(everyone[:, 0], everyone[:, 1], everyone[:, 2], axis=0,
               pooled=tuple(everyone[:, 3 + i] for i in range(len(pooled))))


def platform_moments(x, reduction_axes, weights=None):
  """``(count, mean, M2)`` in XLA: two passes on CPU, shifted sums elsewhere.

  XLA:GPU/TPU fuse the shifted sums' sibling reductions into one read; XLA:CPU
  fuses no siblings, and there the two-pass form costs the same two reads
  and is exact.
  """
  axes = tuple(reduction_axes)
  return lax.platform_dependent(
      cpu=lambda: local_moments(x, axes, weights),
      default=lambda: local_moments_shifted(x, axes, weights))


def moments(x: jax.Array, reduction_axes: Sequence[int], *,
            weights: jax.Array | None = None, axis_name=None,
            axis_index_groups=None) -> Moments:
  """Mean and biased variance over ``reduction_axes`` (and devices), in XLA.

  Args:
    x: data (16-bit data get float32 statistics).
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
