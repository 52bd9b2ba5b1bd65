"""Batch statistics: masked two-pass moments and their exact cross-device merge.

For weights ``w`` (a mask, 1 where an element counts) over reduction axes::

  n    = sum w
  mean = sum(w * x) / n
  M2   = sum(w * (x - mean)^2)          (two-pass: no E[x^2] - E[x]^2 cancellation)
  var  = M2 / n                         (biased; 0 when n == 0)

(a :class:`Triple`, what every moments algorithm here returns). Across
devices, each device's ``(n_i, mean_i, M2_i)`` is merged with Chan's
formula, which stays exact for data with a large mean::

  n = sum n_i,  mean = sum n_i mean_i / n,  M2 = sum M2_i + sum n_i (mean_i - mean)^2

(:func:`merge`, the one merge of triples in jaxbn: devices, virtual batches
and Precise BN use it).

Data spread beyond float32's range for squares are measured in units of a
power of two (:func:`in_units`, the overflow guard), and merged in units.

The triples travel in **one** all-reduce: each device writes its triple into
its own slot of a zero buffer ``(devices, 3, ...)`` and the buffer is
``psum``-ed (an all-gather expressed as a sum, so the compiled program holds
exactly one all-reduce of ``3 * devices * channels`` floats; with units, one
more row for ``inv_unit``).
"""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import modes


class Devices(NamedTuple):
  """The devices a batch's statistics are combined over: the mapped
  ``axis_name`` (a name or tuple; None: this device alone) and its
  ``axis_index_groups``."""

  axis_name: object = None
  groups: tuple | None = None


class InUnits(NamedTuple):
  """A batch's normalization statistics as ``in_units`` gives them, per
  channel (keepdims): ``variance`` in units of ``unit^2``, ``inv_unit``
  None without units."""

  count: jax.Array
  mean: jax.Array
  variance: jax.Array
  inv_unit: jax.Array | None


class Triple(NamedTuple):
  """One group's statistics (a device's, a virtual batch's), per channel
  with the input's rank (reduced axes = 1): the valid elements' ``count``,
  their ``mean`` and ``m2 = sum w (x - mean)^2``; what :func:`merge`
  combines. jaxbn's one ``(count, mean, M2)`` type: every moments
  algorithm returns it (with ``inv_unit`` beside it where the overflow
  guard may put M2 in units, :func:`in_units`)."""

  count: jax.Array
  mean: jax.Array
  m2: jax.Array


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


# A statistics algorithm traced once per input signature and jaxbn mode (the
# modes are part of JAX's trace context), then inlined from JAX's cache into
# each trace that calls it (the lowered program has no nested call): in the
# default mode every training call traces the GPU/TPU algorithm beside the
# CPU one (see modes.platform_dependent), and a model repeats its layers'
# shapes.
_traced_once = functools.partial(jax.jit, static_argnums=(1,),
                                 static_argnames=("reduction_axes",),
                                 inline=True)


def view_of(x, shape):
  """``x.reshape(shape)`` (a free view); for a 16-bit ``x`` on XLA:CPU, one
  whose only reader is an optimization barrier, as is its gradient's (the
  barrier is linear).

  XLA:CPU takes a reshape of a 16-bit array in float32 where a float32
  computation reads it (its bf16 normalization), and hands every other
  reader, such as the barrier that gives each sum its own copy
  (:func:`separate`), a 16-bit copy written out in full. (A barrier keeps
  what follows out of the fusion that writes ``x``, so only where needed.)"""
  view = lambda: x.reshape(shape)
  if tuple(shape) == x.shape or jnp.dtype(x.dtype).itemsize > 2:
    return view()
  return modes.for_compiler(cpu=lambda: lax.optimization_barrier(view()),
                            default=view)


def _sum(x, axes):
  return jnp.sum(x, axis=axes, keepdims=True)


def where_valid(w, values):
  """``values`` where the weight (mask) is nonzero, 0 in padding (``w == 0``)
  whatever ``values`` holds there: a NaN in padding stays out."""
  return values if w is None else jnp.where(w != 0, values, 0)


def clamp(value, low=None, high=None):
  """``value`` within ``[low, high]`` (either may be None), a NaN kept.

  Not ``jnp.maximum``/``jnp.minimum``: fused into a reduction, XLA:CPU's
  max maps NaN to 0, and an overflowed M2 (inf - inf) would pass as a
  constant channel."""
  if low is not None:
    value = jnp.where(value < low, low, value)
  if high is not None:
    value = jnp.where(value > high, high, value)
  return value


def nonnegative(value):
  """``value`` with a negative rounding residue set to 0, a NaN kept."""
  return clamp(value, low=0)


def _weighted(w, values):
  """``w * values``, 0 in padding (see :func:`where_valid`)."""
  return values if w is None else where_valid(w, w * values)


def weighted_sum(w, elementwise, inputs, axes):
  """``sum(w * elementwise(*inputs))`` over ``axes`` (keepdims), padding
  (``w == 0``) left out whatever it holds (see :func:`where_valid`); ``w``
  None: a plain sum.

  Summed first over the reduced axes the weights do not vary along (the
  image of a per-row mask), then weighted: the select that keeps a NaN in
  padding out applies to those partial sums, not to every element. A mask
  that varies along every reduced axis is one pass of :func:`sibling_sums`
  (see there). (Two reductions in a row are not siblings.)"""
  if w is None:
    return _sum(elementwise(*inputs), axes)
  w, along_rows, across_rows = _row_axes(w, jax.eval_shape(
      elementwise, *inputs), axes)
  if not along_rows:
    return sibling_sums(lambda *a: (elementwise(*a),), inputs, axes, w)[0]
  return _sum(_weighted(w, _sum(elementwise(*inputs), along_rows)),
              across_rows)


def valid_max(w, values, axes):
  """The largest of nonnegative ``values`` over ``axes`` (keepdims) where
  the weight is nonzero, 0 where there is none; as :func:`sibling_sums`,
  each row's largest first, then the padding's left out. ``values``: a
  function and its inputs. A mask that varies per element selects inside
  one variadic loop on XLA:CPU (:func:`_sum_and_max_in_one_loop`), whose
  reduction fusions would write the select out."""
  elementwise, inputs = values
  largest = lambda v, axes: jnp.max(v, axis=axes, keepdims=True, initial=0)
  if w is None:
    return largest(elementwise(*inputs), axes)
  w, along_rows, across_rows = _row_axes(w, jax.eval_shape(
      elementwise, *inputs), axes)
  if along_rows:
    return largest(where_valid(w, largest(elementwise(*inputs), along_rows)),
                   across_rows)
  return modes.for_compiler(
      cpu=lambda: _sum_and_max_in_one_loop(
          where_valid(w, elementwise(*inputs)), axes)[1],
      default=lambda: largest(where_valid(w, elementwise(*inputs)), axes))


def unless_non_finite(results, exact):
  """``results`` (per-channel sums taken with a mask or the ReLU's gate as a
  product: a NaN or an infinity in padding, or behind a closed gate, spoils
  them: ``0 * inf``), each channel that is not finite in
  one of them taken again from ``exact()`` in a :func:`guard_cond` that
  ordinary batches skip. ``exact`` recomputes from the passes' inputs (its
  branch must not read a value computed for the products, which XLA would
  then write out)."""
  finite = functools.reduce(operator.and_, [jnp.isfinite(r) for r in results])

  def retaken():
    return tuple(jnp.where(finite, r, e) for r, e in zip(results, exact()))

  return guard_cond(~jnp.all(finite), retaken, lambda: tuple(results))


def _row_axes(w, values, axes):
  """``w`` at ``values``' rank, and ``axes`` split into those ``w`` does not
  vary along and the others."""
  w = w.reshape((1,) * (values.ndim - w.ndim) + w.shape)
  along = tuple(a for a in axes if w.shape[a] == 1)
  return w, along, tuple(a for a in axes if a not in along)


@_traced_once
def local_moments(x: jax.Array, reduction_axes: Sequence[int],
                  weights: jax.Array | None = None, inv_unit=None,
                  shift=None) -> Triple:
  """The :class:`Triple` of one device's data: two passes.

  The corrected two-pass algorithm. Pass one sums around a data value ``s``
  (:func:`sampled_shift`): ``S1 = sum w (x - s)``, ``m = s + S1 / n``. Pass
  two: ``Q = sum w (x - m)^2``. The float32 ``m`` is off the true mean by up
  to half an ulp, ``delta``, which adds ``n delta^2`` to ``Q`` (1e-3 of the
  variance at mean 1e6, std 1); ``e = S1 - n (m - s) = n delta`` is that
  residual, so ``M2 = Q - e^2 / n``. ``x`` may be 16-bit; the arithmetic is
  in ``stat_dtype(x.dtype)``. With ``inv_unit``, the moments of ``x *
  inv_unit`` (the scaling fused into each pass); ``shift``, if given, is
  ``s`` (in those units).
  """
  axes = tuple(reduction_axes)
  sd = stat_dtype(x.dtype)
  x_for_mean, x_for_m2 = separate(x, x)
  count = reduce_count(x.shape, axes, weights, sd)
  w = None if weights is None else weights.astype(sd)
  # (each pass its own copy of inv_unit: XLA:CPU writes out a broadcast
  # that two fusions share)
  inv_for_mean, inv_for_m2 = (None, None) if inv_unit is None else separate(
      inv_unit, inv_unit)
  if shift is None:
    shift = to_units(sampled_shift(x, axes, weights, sd), inv_for_mean)
  s1 = weighted_sum(w, lambda x, inv, shift: to_units(x.astype(sd), inv)
                    - shift, (x_for_mean, inv_for_mean, shift), axes)
  mean = shift + safe_divide(s1, count)
  q = weighted_sum(w, lambda x, inv, mean: jnp.square(
      to_units(x.astype(sd), inv) - mean), (x_for_m2, inv_for_m2,
                                             separate(mean)[0]), axes)
  residual = s1 - count * (mean - shift)
  m2 = nonnegative(q - safe_divide(residual * residual, count))
  return Triple(jnp.broadcast_to(count, mean.shape), mean, m2)


# Enough that one outlier (or a few) cannot move their median far from the
# data's middle; few enough that choosing it is cheap (see _lower_median).
# The two-pass statistics need no more: their second pass, around the mean,
# corrects a poor shift.
SHIFT_SAMPLES = 16
# The one-read statistics (GPU/TPU) live with the shift: M2 = S2 - S1^2 / n
# loses (mean - s)^2 / var ulps, about rows / k for a shift taken from k
# outlier rows. Their shift is the lower median of this many distinct rows
# (of the first reduced axis, where it has them), so that no placement of up
# to ONE_READ_SHIFT_ROWS // 2 outlier rows can reach it; with fewer rows,
# such outliers are a large share of the batch, which keeps the loss small.
ONE_READ_SHIFT_ROWS = 33


def _sample_grid(sizes, target, first=1):
  """Samples per reduced axis: ``first`` (at most its size) on the first,
  then doubled on the least sampled axis (relative to its size) until there
  are ``target`` of them or every position."""
  counts = [min(first, sizes[0])] + [1] * (len(sizes) - 1) if sizes else []
  while math.prod(counts) < target:
    growable = [i for i, (c, n) in enumerate(zip(counts, sizes)) if c < n]
    if not growable:
      break
    i = max(growable, key=lambda i: sizes[i] / counts[i])
    counts[i] = min(2 * counts[i], sizes[i])
  return counts


def sampled_shift(x, reduction_axes, weights=None, dtype=None, rows=1):
  """Per channel (keepdims): the lower median of about ``SHIFT_SAMPLES``
  values of ``x`` (or ``rows``, if more) on an evenly spaced grid over the
  reduced positions, ``rows`` of them along the first reduced axis (at most
  its size),
  counting only valid, finite ones (0 where there is none). No gradient.

  A data value near the middle of the batch: outliers on fewer than half the
  samples cannot move it, so ``(mean - shift)^2 / var``, the cancellation
  factor of shifted sums, stays of order 1. The grid is strided slices,
  which read only the samples.
  """
  axes = tuple(sorted(reduction_axes))
  dtype = dtype or stat_dtype(x.dtype)
  shape = x.shape
  kept_shape = tuple(1 if i in axes else n for i, n in enumerate(shape))
  if any(shape[a] == 0 for a in axes):
    return jnp.zeros(kept_shape, dtype)
  counts = dict(zip(axes, _sample_grid([shape[a] for a in axes],
                                       SHIFT_SAMPLES, rows)))

  def grid(value, along=counts):
    index = []
    for i, n in enumerate(value.shape):
      if i in along and n != 1:
        stride = n // along[i]
        index.append(slice(stride // 2, n, stride))
      else:
        index.append(slice(None))
    return value[tuple(index)]

  w = None
  if weights is not None:
    w = jnp.asarray(weights)
    w = w.reshape((1,) * (len(shape) - w.ndim) + w.shape)
  masked_axes = tuple(a for a in axes if w is not None and w.shape[a] != 1)
  if masked_axes and all(w.shape[i] == 1 for i in range(len(shape))
                         if i not in axes):
    # a mask shared by the channels (rows, time steps): sample among its
    # valid positions, so that a mask hiding nearly every row still leaves
    # data values to shift by
    sample, valid = _sample_valid(x, w, masked_axes, counts, grid)
    sample = sample.astype(dtype)
    valid = valid & jnp.isfinite(sample)
  else:
    # The sample on its own (the barrier keeps the slice out of the fusions
    # that convert and select, where XLA's cost analysis charges all of x)
    sample = lax.optimization_barrier(grid(x)).astype(dtype)
    valid = jnp.isfinite(sample)
    if w is not None:
      valid = valid & (lax.optimization_barrier(grid(w)) != 0)
  sample = jnp.where(valid, sample, jnp.nan)
  sample = jnp.moveaxis(sample, axes, range(len(axes)))
  sample = sample.reshape((-1,) + sample.shape[len(axes):])
  median = _lower_median(sample)
  return lax.stop_gradient(median.reshape(kept_shape).astype(dtype))


def _sample_valid(x, w, masked_axes, counts, grid):
  """``(sample, valid)`` of ``x``, with x's rank: ``prod(counts)`` of the
  masked axes' positions at evenly spread *valid* positions of the mask
  ``w`` (which varies along ``masked_axes`` only: it is shared by the
  channels), laid along the first masked axis (1 along the others); the
  other reduced axes on ``grid``; the kept axes whole. Reads the mask and
  the sampled rows, not x."""
  others = {a: c for a, c in counts.items() if a not in masked_axes}
  wanted = math.prod(counts[a] for a in masked_axes)
  # the other reduced axes on the grid first (x's masked axes whole)
  x_other = lax.optimization_barrier(grid(x, others))
  mask = w
  for a in sorted(set(range(w.ndim)) - set(masked_axes)):
    mask = lax.index_in_dim(mask, 0, a, keepdims=True)
  valid_flat = (mask != 0).reshape(-1)
  rank = jnp.cumsum(valid_flat.astype(jnp.int32))
  total = rank[-1]
  # the (j + 1/2) total / wanted -th valid position, j < wanted
  target = (2 * jnp.arange(wanted) + 1) * total // (2 * wanted)
  position = jnp.minimum(_first_reaching(rank, target + 1),
                         valid_flat.size - 1)
  moved = jnp.moveaxis(x_other, masked_axes, range(len(masked_axes)))
  flat = moved.reshape((-1,) + moved.shape[len(masked_axes):])
  sample = jnp.take(flat, position, axis=0)
  valid = jnp.broadcast_to((total > 0).reshape((1,) * sample.ndim),
                           sample.shape)
  # back to x's rank with the masked axes first: (wanted, 1..., rest)
  sample = sample.reshape((wanted,) + (1,) * (len(masked_axes) - 1)
                          + sample.shape[1:])
  valid = valid.reshape(sample.shape)
  return (jnp.moveaxis(sample, range(len(masked_axes)), masked_axes),
          jnp.moveaxis(valid, range(len(masked_axes)), masked_axes))


def _first_reaching(rank, target):
  """For each ``target``, the first index ``i`` with ``rank[i] >= target``
  (``rank.size`` if none); ``rank`` is non-decreasing and 1-D.

  On GPU/TPU a compare of every position with every target (no loop: a
  while loop's predicate goes to the host each step on GPU); XLA:CPU writes
  that positions x targets array out (a quarter of a float32 (B, T, 64)
  input for a sequence mask), so there a binary search (a loop, free on
  CPU). Written out rather than ``jnp.searchsorted``, which fails to trace
  where the data vary along a manual mesh axis beside automatic ones
  (``shard_map`` with ``axis_names``)."""
  n = rank.size

  def compare_all():
    return jnp.sum(rank[None, :] < target[:, None], axis=1, dtype=jnp.int32)

  def bisect():
    def halve(_, bounds):  # the answer stays in [low, high]
      low, high = bounds
      middle = (low + high) // 2  # == high once low == high: no move
      below = rank[jnp.minimum(middle, n - 1)] < target
      return (jnp.where(below & (low < high), middle + 1, low),
              jnp.where(below, high, middle))
    bounds = (jnp.zeros_like(target), jnp.full_like(target, n))
    return lax.fori_loop(0, n.bit_length(), halve, bounds)[0]

  return modes.for_compiler(cpu=bisect, default=compare_all)


_RANK_BLOCK = 32


def _lower_median(sample):
  """Per column of ``sample`` (``(k, ...)``, NaN = not valid): the lower
  middle of its valid values, 0 where there is none.

  A data value (an interpolating median's ``(a + b) / 2`` overflows near the
  float32 maximum), chosen by rank: value i's rank is the number of values
  below it (NaNs count as above everything, ties go by position), and the
  lower median is the value of rank ``(valid - 1) // 2``. That is ``k^2``
  comparisons per column in one fused elementwise reduction: XLA:CPU's sort
  is far slower for thousands of short columns (figures in CHANGELOG).
  """
  k = sample.shape[0]
  # the others in blocks of at most _RANK_BLOCK (NaN pads, which count for
  # nothing), each block's count a sum over its own axis: XLA:CPU rewrites
  # a longer sum into a reduce-window and writes its k x k x channels
  # comparisons out in full (64x the input of a 64 x 1024 batch)
  blocks = -(-k // _RANK_BLOCK)
  block = -(-k // blocks)
  padded = jnp.pad(sample, [(0, blocks * block - k)] + [(0, 0)] * (
      sample.ndim - 1), constant_values=jnp.nan)
  value = sample[:, None, None]
  other = padded.reshape((1, blocks, block) + sample.shape[1:])
  position = jnp.arange(blocks * block).reshape(
      (1, blocks, block) + (1,) * (sample.ndim - 1))
  own = jnp.arange(k).reshape((k, 1, 1) + (1,) * (sample.ndim - 1))
  below = ((other < value) | (jnp.isnan(value) & ~jnp.isnan(other))
           | ((other == value) & (position < own)))
  # the k x channels ranks are written out between their sums and the
  # choice: int8 keeps them a quarter of float32's size
  ranks = jnp.int8 if k <= jnp.iinfo(jnp.int8).max else jnp.int32
  rank = jnp.sum(jnp.sum(below, axis=2, dtype=ranks), axis=1, dtype=ranks)
  count = _sum_in_blocks(~jnp.isnan(sample), jnp.int32)
  middle = (jnp.maximum(count - 1, 0) // 2).astype(ranks)
  # the chosen value's bits summed as integers (one term is nonzero: exact):
  # XLA:CPU writes out a select before a float sum, not before an int sum
  bits = jnp.dtype(f"int{8 * sample.dtype.itemsize}")
  chosen = jnp.where(rank == middle,
                     lax.bitcast_convert_type(jnp.nan_to_num(sample), bits), 0)
  median = lax.bitcast_convert_type(_sum_in_blocks(chosen, bits), sample.dtype)
  return jnp.where(count > 0, median, 0)


def _sum_in_blocks(values, dtype):
  """The sum over axis 0 as a sum of slices' sums, each of at most
  ``_RANK_BLOCK`` values: XLA:CPU splits a longer sum into a reduce-window
  that writes its input out in full. (A reshape of these k-first values
  into blocks is rewritten into one too; the ranks' comparisons, formed in
  blocks from the start, are not, and fuse better than slices of them.)"""
  values = values.astype(dtype)
  return functools.reduce(operator.add, (
      jnp.sum(values[i:i + _RANK_BLOCK], axis=0, dtype=dtype)
      for i in range(0, values.shape[0], _RANK_BLOCK)))


def sibling_sums(elementwise, inputs, reduction_axes, w=None):
  """``sum w v`` over ``reduction_axes`` (keepdims) for each ``v`` of
  ``elementwise(*inputs)`` (values of one shape; ``w`` None: plain sums),
  padding (``w == 0``) left out whatever it holds: sibling reductions of one
  read of the inputs.

  XLA:GPU/TPU fuse siblings into one read of their common input
  (multi-output fusion). XLA:CPU fuses none, and writes out in full an
  elementwise producer that two reductions share: there each sum gets its
  own copy of the inputs (:func:`separate`) and computes its own values,
  so every producer stays inside the reduction that reads it (the same
  numbers; ``modes.for_compiler`` picks the layout).

  The weights apply to each row's sums (over the axes ``w`` does not vary
  along), so the passes over the inputs hold no select, which XLA:CPU's
  reduction fusions (YNNPACK's: arithmetic only) would write out in full.
  A mask that varies along every reduced axis (a sequence mask) applies per
  element: a select on GPU/TPU, a product on XLA:CPU (each sum with its own
  copy of the weights), where a channel whose sums come out non-finite (a
  NaN or an infinity in padding: ``0 * inf``) has them taken again with the
  select in one loop (:func:`sums_in_one_loop`, in a :func:`guard_cond`
  that ordinary batches skip). (One
  variadic reduction would say "siblings" explicitly, but XLA:CPU runs it
  as a sequential loop whose float32 error grows with the count: 1e-3 at a
  million rows.)"""
  axes = tuple(reduction_axes)

  def sums(values):
    if w is None:
      return tuple(_sum(v, axes) for v in values)
    weights, along_rows, across_rows = _row_axes(w, values[0], axes)
    partial = (tuple(_sum(v, along_rows) for v in values) if along_rows
               else values)
    return tuple(_sum(_weighted(weights, p), across_rows) for p in partial)

  def apart():
    shapes = jax.eval_shape(elementwise, *inputs)
    count, k = len(shapes), len(inputs)
    per_element = w is not None and not _row_axes(w, shapes[0], axes)[1]
    if not per_element:
      copies = separate(*inputs * count)  # one barrier: XLA merges equal ones
      return tuple(sums((elementwise(*copies[i * k:(i + 1) * k])[i],))[0]
                   for i in range(count))
    # each sum its own copy of the weights too: a broadcast of them that
    # two sums share is written out in full
    copies = separate(*(inputs + (w,)) * count)
    results = tuple(
        _sum(_row_axes(copies[i * (k + 1) + k], shapes[0], axes)[0]
             * elementwise(*copies[i * (k + 1):i * (k + 1) + k])[i], axes)
        for i in range(count))
    return unless_non_finite(results, lambda: sums_in_one_loop(
        elementwise(*inputs), axes, w))

  return modes.for_compiler(cpu=apart,
                            default=lambda: sums(elementwise(*inputs)))


def _sum_and_max_in_one_loop(values, axes):
  """``(sum, max(., 0))`` of ``values`` over ``axes`` (keepdims) as one
  variadic reduction, which XLA:CPU runs as a loop of its own that takes in
  any elementwise producer, a select included (see
  :func:`sums_in_one_loop`). XLA makes a reduction of one operand, or of one
  operand twice, or one whose other result is unused, YNNPACK's again
  (which writes a select out): two different reductions, kept both behind a
  barrier."""
  axes = tuple(axes)
  zero = jnp.zeros((), values.dtype)
  both = lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1]))
  results = lax.optimization_barrier(lax.reduce(
      (values, values), (zero, zero), both, axes))
  return tuple(jnp.expand_dims(r, axes) for r in results)


def sums_in_one_loop(values, reduction_axes, w=None):
  """``sum w v`` over ``reduction_axes`` (keepdims) for each of ``values``,
  padding (``w == 0``) left out whatever it holds: one variadic reduction.

  XLA:CPU runs it as a loop of its own, which takes in any elementwise
  producer (a select included) where its reduction fusions take none, at a
  sequential float32 error that grows with the count (1e-3 relative at a
  million rows): for a rare retake, not for every step. (One value is
  reduced beside its maximum: :func:`_sum_and_max_in_one_loop`.)"""
  axes = tuple(reduction_axes)
  values = tuple(_weighted(w, v) for v in values)
  if len(values) == 1:
    return (_sum_and_max_in_one_loop(values[0], axes)[0],)
  zeros = tuple(jnp.zeros((), v.dtype) for v in values)
  add = lambda a, b: tuple(p + q for p, q in zip(a, b))
  return tuple(jnp.expand_dims(total, axes)
               for total in lax.reduce(values, zeros, add, axes))


@_traced_once
def local_moments_shifted(x: jax.Array, reduction_axes: Sequence[int],
                          weights: jax.Array | None = None) -> Triple:
  """The :class:`Triple` from one read of shifted sums (GPU/TPU).

  With a per-channel shift ``s`` (:func:`sampled_shift`),
  ``S1 = sum w (x - s)`` and ``S2 = sum w (x - s)^2`` are sibling
  reductions of one read (:func:`sibling_sums`); ``M2 = S2 - S1^2 / n`` loses about
  ``(mean - s)^2 / var`` ulps, of order 1 for a shift from the data's middle.
  """
  axes = tuple(reduction_axes)
  if modes.sharded_along(x, axes):  # no local sample to shift by
    return local_moments(x, axes, weights)
  sd = stat_dtype(x.dtype)
  count = reduce_count(x.shape, axes, weights, sd)
  shift = sampled_shift(x, axes, weights, sd, ONE_READ_SHIFT_ROWS)
  w = None if weights is None else weights.astype(sd)

  def centered_powers(x, shift):
    centered = x.astype(sd) - shift
    return centered, jnp.square(centered)

  s1, s2 = sibling_sums(centered_powers, (x, shift), axes, w)
  mean_shifted = safe_divide(s1, count)
  m2 = nonnegative(s2 - s1 * mean_shifted)
  return Triple(jnp.broadcast_to(count, s1.shape), shift + mean_shifted, m2)


# A channel whose variance exceeds this (a spread beyond 2^30, about 1e9) has
# its statistics taken again in units of a power of two (:func:`in_units`):
# float32 sums of squares of a spread beyond about 1e19 overflow, and the
# backward's ``inv^3`` leaves the float32 range beyond a spread of about 4e12.
UNIT_FREE_VARIANCE_LIMIT = 2.0 ** 60
# Units stay within 2^-126..2^126, so that 1 / unit is a normal number (XLA:CPU
# flushes subnormal numbers to 0).
_UNIT_EXPONENT_LIMIT = 126


def to_units(values, inv_unit):
  """``values`` in units: ``values * inv_unit`` (exact, a power of two per
  channel), or ``values`` where there are no units (``inv_unit`` None)."""
  return values if inv_unit is None else values * inv_unit


def inverse_unit(magnitude: jax.Array) -> jax.Array:
  """Per element ``1 / u`` for the power of two ``u >= |magnitude|`` (within
  2^-126..2^126); 1 where ``magnitude`` is 0 or not finite."""
  magnitude = jnp.abs(magnitude)
  if magnitude.dtype == jnp.float32:
    # from the bits: |m| < 2^(E - 126) for the biased exponent E, and
    # 1 / 2^e is the float32 whose biased exponent is 127 - e
    biased = (lax.bitcast_convert_type(magnitude, jnp.int32) >> 23) & 0xFF
    exponent = jnp.clip(biased - 126, -_UNIT_EXPONENT_LIMIT,
                        _UNIT_EXPONENT_LIMIT)
    inverse = lax.bitcast_convert_type((127 - exponent) << 23, jnp.float32)
  else:
    _, exponent = jnp.frexp(magnitude)
    exponent = jnp.clip(exponent, -_UNIT_EXPONENT_LIMIT, _UNIT_EXPONENT_LIMIT)
    inverse = jnp.ldexp(jnp.ones_like(magnitude), -exponent)
  return jnp.where(jnp.isfinite(magnitude) & (magnitude != 0), inverse, 1)


def needs_units(count, mean, m2) -> jax.Array:
  """Per channel: may these float32 statistics have overflowed, or is the
  variance beyond what the unit-free passes keep in range?"""
  return (~jnp.isfinite(mean) | ~jnp.isfinite(m2)
          | (m2 > UNIT_FREE_VARIANCE_LIMIT * count))


def in_units(local_moments_fn, x, reduction_axes, weights=None):
  """``(triple, inv_unit)``: the :class:`Triple` that
  ``local_moments_fn(x, reduction_axes, weights)`` gives, taken in units
  where the overflow guard needs them.

  Batch norm is invariant to scaling a channel (with epsilon scaled alike),
  so a channel whose data spread beyond float32's range for squares (see
  :func:`needs_units`) is measured in units ``u``, a power of two (at most
  2^126): its scaled values, squares and sums stay in range, and scaling
  by ``u`` is exact. ``M2`` is then in units of ``u^2`` and ``inv_unit = 1 /
  u`` (1 for every ordinary channel, whose results are those of the unit-free
  algorithm; a non-finite channel keeps them too).

  How the units are found depends on where a conditional is cheap:

  * **CPU** (XLA:CPU branches on the host, for free): ``local_moments_fn``
    runs, and a channel that needs units has its statistics taken again
    (:func:`retaken_in_units`: two XLA passes plus one for the magnitude, ``u
    >= max |x|``) in a ``lax.cond`` that ordinary batches skip.
  * **GPU, TPU and** ``JAXBN_STATISTICS=accelerator``: no conditional (XLA:GPU
    copies a conditional's predicate to the host and drains the stream):
    :func:`scaled_moments` reads x once, its sums clamped and in units of
    2^96 so that none can overflow, and picks the units from the sums (``u
    >= std``).

  Under ``jaxbn.modes.overflow_guard('off')`` neither runs: ``inv_unit`` is
  None (no units: every consumer then builds the program it built without
  them) and a spread beyond about 1e18 overflows.
  """
  axes = tuple(reduction_axes)
  if modes.overflow_guard.value == "off":
    return local_moments_fn(x, axes, weights), None
  return where_a_cond_is_cheap(
      lambda: retaken_in_units(local_moments_fn, x, axes, weights),
      lambda: scaled_moments(x, axes, weights))


def where_a_cond_is_cheap(guarded, branch_free):
  """``guarded()`` on CPU, where the overflow guard's ``lax.cond`` branches on
  the host for free; ``branch_free()`` on GPU/TPU (XLA:GPU copies a
  conditional's predicate to the host and drains the stream) and under
  ``JAXBN_STATISTICS=accelerator``. The one place that decides it, for the
  statistics (:func:`in_units`); the backward has no cond on any platform
  (``passes.backward`` runs in units, the CPU kernel included).

  Also ``branch_free()`` on CPU where the traced code runs on a mesh with an
  automatic axis (e.g. ``shard_map`` over ``data`` leaving ``model`` to XLA):
  the channels may be sharded over it, and the cond's predicate, an ``any``
  over the channels, would cost a collective over that axis on every step.
  """
  if modes.automatic_mesh_axes():
    return branch_free()
  return modes.platform_dependent(cpu=guarded, default=branch_free)


def retaken_in_units(local_moments_fn, x, axes, weights=None):
  """``(triple, inv_unit)``: ``local_moments_fn``'s :class:`Triple`,
  taken again in units (``u`` a power of two ``>= max |x|``, within
  2^-126..2^126) for the channels that need them (:func:`needs_units`), in
  a ``lax.cond`` that runs only when one does (:func:`guard_cond`)."""
  count, mean, m2 = local_moments_fn(x, axes, weights)
  needed = needs_units(count, mean, m2)

  def retake():
    magnitude = valid_max(weights, (lambda x: jnp.abs(x.astype(mean.dtype)),
                                    separate(x)), axes)
    retaken = needed & jnp.isfinite(magnitude)
    inv_unit = jnp.where(retaken, inverse_unit(magnitude), 1)
    # around the first estimate of the mean where it is finite (a shift
    # near the data keeps S1's rounding small; no second sample needed)
    shift = jnp.where(jnp.isfinite(mean), mean, 0) * inv_unit
    scaled = local_moments(x, axes, weights, inv_unit, shift)
    return (jnp.where(retaken, scaled.mean / inv_unit, mean),
            jnp.where(retaken, scaled.m2, m2), inv_unit)

  mean, m2, inv_unit = guard_cond(
      jnp.any(needed), retake, lambda: (mean, m2, jnp.ones_like(mean)))
  return Triple(count, mean, m2), inv_unit


# The scaled sums (:func:`scaled_sums`): the centred values ``z`` clamped to
# +-2^CLAMP_EXPONENT, and all of them in units of B = 2^BIG_EXPONENT. Neither
# leaves float32's range: clamped, ``c^2 <= 2^80`` (sums of fewer than 2^47
# elements); in units of B, ``|z / B| <= 2^33``.
CLAMP_EXPONENT = 40
BIG_EXPONENT = 96


class ScaledSums(NamedTuple):
  """Per-channel sums (keepdims) of ``z = x - shift``, with ``c = clamp(z,
  -T, T)``, ``T = 2^40``, and ``z_B = x / B - shift / B``, ``B = 2^96``:
  the clamped sums are those of ``z`` where no value was clamped
  (``excess == 0``), the sums in units of B hold every value (ones
  within 2^-30 of the shift flush to 0 there, which only a clamped
  channel's spread beyond 2^40 reads)."""

  clamped: jax.Array          # sum w c
  clamped_squares: jax.Array  # sum w c^2
  in_b: jax.Array             # sum w z_B
  squares_in_b: jax.Array     # sum w z_B^2
  excess: jax.Array           # sum w max(|z_B| - T / B, 0)

  @property
  def clamped_any(self) -> jax.Array:
    """Per channel: was a value clamped (or not finite)?"""
    return self.excess != 0


def scaled_sums(x, reduction_axes, weights, shift, dtype) -> ScaledSums:
  """:class:`ScaledSums` of ``x`` around ``shift``: five sibling reductions
  of one read of x (:func:`sibling_sums`), in arithmetic alone (no compare
  or select per element: XLA:CPU's reduction fusions take none).

  The clamps are maxima, whose NaN handling is not to be trusted; none
  needs to be. A NaN in x reaches ``in_b`` through plain arithmetic and
  ``clamped`` too (``_clip`` subtracts from the value itself), so a NaN
  channel's statistics are NaN from either kind of sums; an infinity makes
  ``excess`` infinite, so the channel takes the sums in units of B, which
  hold it.
  """
  w = None if weights is None else weights.astype(dtype)

  def summands(x, shift, zero, bound, unit):
    x = x.astype(dtype)
    clamped = _clip(x - shift, zero, bound)
    # scaled before the difference, which may be beyond float32's range
    z_b = x * unit - shift * unit
    excess = jnp.maximum(jnp.abs(z_b) - bound * unit, zero)
    return clamped, jnp.square(clamped), z_b, jnp.square(z_b), excess

  # the constants are inputs, so that each XLA:CPU sum has its own (see
  # sibling_sums): one broadcast constant that several read is written out
  constants = tuple(jnp.asarray(c, dtype) for c in (
      0, 2.0 ** CLAMP_EXPONENT, 2.0 ** -BIG_EXPONENT))
  return ScaledSums(*sibling_sums(summands, (x, shift, *constants),
                                  reduction_axes, w))


def _clip(value, zero, bound):
  """``value`` within ``[-bound, bound]`` as two maxima: XLA rewrites a
  ``min`` of a ``max`` into a ``clamp``, which no XLA:CPU reduction fusion
  takes. Exact where ``|value| <= bound``; a value beyond it is not
  (``value - (value - bound)`` rounds): the caller uses only the exact."""
  return (value - jnp.maximum(value - bound, zero)
          + jnp.maximum(-value - bound, zero))


@_traced_once
def scaled_moments(x: jax.Array, reduction_axes: Sequence[int],
                   weights: jax.Array | None = None):
  """``(triple, inv_unit)`` (a :class:`Triple`) from one read of x, with
  no conditional (GPU/TPU; any spread within float32's range).

  :func:`scaled_sums` around the sampled shift ``s`` (:func:`sampled_shift`).
  A channel with no value clamped has ``mean = s + S1 / n`` and ``M2 = S2 -
  S1^2 / n`` from its clamped sums, which are exact sums of z, as
  :func:`local_moments_shifted`; it is in units (``u``, the power of two
  ``>= std``: its variance in units lies in (1/4, 1]) where that variance
  is beyond ``UNIT_FREE_VARIANCE_LIMIT``, and unit-free (``inv_unit = 1``,
  the shifted sums' numbers) otherwise. A channel with a value clamped
  (beyond 2^40 of the shift, or not finite) takes both from its sums in
  units of ``B = 2^96`` (``M2 = S2_B - S1_B^2 / n`` in units of ``B^2``,
  which cannot overflow) and is always in units. Non-finite channels keep
  non-finite statistics and unit 1. Every choice is per channel
  (``jnp.where``), and every factor out of float32's range is applied in
  steps (:func:`_times_power_of_two`), so that autodiff through the side
  not taken stays finite.
  """
  axes = tuple(reduction_axes)
  sd = stat_dtype(x.dtype)
  count = reduce_count(x.shape, axes, weights, sd)
  if modes.sharded_along(x, axes):
    # no local sample to shift by: around a first pass's mean instead
    first = scaled_sums(x, axes, weights, 0, sd)
    shift = lax.stop_gradient(_scaled_offset(first, count))
  else:
    shift = sampled_shift(x, axes, weights, sd, ONE_READ_SHIFT_ROWS)
  sums = scaled_sums(x, axes, weights, shift, sd)
  n = jnp.broadcast_to(count, sums.clamped.shape)
  mean = shift + _scaled_offset(sums, n)
  was_clamped = sums.clamped_any
  # nothing clamped: the shifted sums, in units where the variance is
  # beyond the limit
  m2_small = nonnegative(
      sums.clamped_squares - sums.clamped * safe_divide(sums.clamped, n))
  beyond_limit = needs_units(n, mean, m2_small)
  inv_small = jnp.where(
      beyond_limit & jnp.isfinite(mean) & jnp.isfinite(m2_small),
      inverse_unit(_root(safe_divide(m2_small, n))), 1)
  # clamped: M2 in units of B, then in units of u (B / u = b_over_u)
  m2_in_b = nonnegative(
      sums.squares_in_b - sums.in_b * safe_divide(sums.in_b, n))
  inv_big = jnp.maximum(_times_power_of_two(inverse_unit(
      _root(safe_divide(m2_in_b, n))), -BIG_EXPONENT),
                        2.0 ** -_UNIT_EXPONENT_LIMIT)  # a normal number
  b_over_u = jnp.where(was_clamped,
                       _times_power_of_two(inv_big, BIG_EXPONENT), 0)
  inv_unit = jnp.where(was_clamped, jnp.where(
      jnp.isfinite(mean) & jnp.isfinite(m2_in_b), inv_big, 1), inv_small)
  m2 = jnp.where(was_clamped, m2_in_b * b_over_u * b_over_u,
                 m2_small * inv_small * inv_small)
  return Triple(n, mean, m2), inv_unit


def _root(value):
  """``sqrt(value)`` with no gradient (the magnitude a unit is chosen by)."""
  return lax.stop_gradient(jnp.sqrt(value))


def _scaled_offset(sums: ScaledSums, count):
  """``S1 / n`` of :class:`ScaledSums`: from the clamped sums where nothing
  was clamped, from the sums in units of B otherwise."""
  return jnp.where(sums.clamped_any, _times_power_of_two(
      safe_divide(sums.in_b, count), BIG_EXPONENT),
                   safe_divide(sums.clamped, count))


def _times_power_of_two(value, exponent: int):
  """``value * 2^exponent``, in factors of at most 2^64 that XLA may not
  fold into one (it folds a chain of constant factors into their product,
  which for 2^192 is inf: 0 * inf = NaN)."""
  while exponent:
    step = max(-64, min(64, exponent))
    factor = lax.optimization_barrier(jnp.asarray(2.0 ** step, value.dtype))
    value, exponent = value * factor, exponent - step
  return value


def guard_cond(needed: jax.Array, general, ordinary):
  """``general()`` where ``needed`` (a scalar bool), else ``ordinary()``: the
  overflow guard's ``lax.cond``. ``general`` must give every channel (and
  every ``vmap`` member) its right numbers whatever they need, selecting per
  channel itself, so under ``vmap`` the predicate is reduced over the
  members (:func:`_any_member`) and the cond stays a cond: an ensemble
  whose members are all ordinary runs ``ordinary`` alone, where a batched
  predicate would run both branches for every member. Where ``needed`` is
  already known (an eager call that stays op by op: with an ``adjustment``
  callable or an unhashable config, or under forward-mode autodiff) only the
  branch it picks runs: an eager ``lax.cond`` traces and compiles both
  branches again on every call, as they are new closures each time."""
  try:
    known = bool(needed)
  except jax.errors.ConcretizationTypeError:  # traced: jit, vmap, remat...
    return lax.cond(_any_member(needed), general, ordinary)
  return general() if known else ordinary()


@jax.custom_batching.custom_vmap
def _any_member(needed: jax.Array) -> jax.Array:
  """``needed``; under ``vmap``, whether any member needs it (unbatched)."""
  return needed


@_any_member.def_vmap
def _any_member_vmap(axis_size, in_batched, needed):
  del axis_size
  return (jnp.any(needed) if in_batched[0] else needed), False


def unscaled_variance(variance: jax.Array, inv_unit: jax.Array | None
                      ) -> jax.Array:
  """A variance in units of ``unit^2`` in plain units, saturated at the
  float32 (dtype) maximum where it overflows: a finite variance beyond the
  dtype's range (a spread beyond about 1.8e19 in float32) is stored as the
  largest finite number, never as inf. Non-finite inputs stay non-finite."""
  if inv_unit is None:
    return variance
  unit = 1 / inv_unit  # exact; inv_unit^2 underflows for units beyond 2^63
  return saturated(variance * unit * unit, variance)


def saturated(value: jax.Array, source: jax.Array) -> jax.Array:
  """``value``, with the dtype's maximum where it overflowed to inf from a
  finite ``source`` (a variance that exists but is beyond the range)."""
  overflowed = jnp.isfinite(source) & jnp.isinf(value)
  return jnp.where(overflowed, jnp.finfo(value.dtype).max, value)


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
          pooled: tuple = (), inv_unit=None):
  """``(count, mean, M2, *pooled sums, inv_unit)`` of the groups stacked
  along ``axis``.

  Chan's formula: ``n = sum n_i``, ``mean = sum n_i mean_i / n`` and
  ``M2 = sum M2_i + sum n_i (mean_i - mean)^2``. With ``between=False`` the
  second term is left out: ``M2 / n`` is then the count-weighted average of
  the groups' variances, which is what Keras' virtual batches average.
  ``pooled`` values are summed along. Written with array methods only, so
  NumPy float64 arrays stay NumPy (Precise BN) and JAX arrays stay JAX
  (with ``inv_unit``: JAX only). Empty groups count for nothing.

  ``inv_unit`` (see :func:`in_units`): each group's ``1 / unit``, ``M2`` and
  the pooled sums being in units of ``unit^2``. The merge is then done in
  the largest unit, or in one above every mean where the means are spread
  beyond 2^30 (their squared differences would leave float32). That
  ``inv_unit`` is returned last (None without units).
  """
  total = count.sum(axis, keepdims=True)
  # around a reference, the first non-empty group's mean: equal means then
  # merge exactly, and n_i * mean_i cannot round at large means
  first = (count > 0).argmax(axis)
  reference = _take(mean, first, axis)
  common = None
  if inv_unit is not None:
    common = _common_inverse_unit(count, mean, reference, inv_unit, axis)
    ratio = (common / inv_unit) ** 2
    m2, pooled = m2 * ratio, tuple(v * ratio for v in pooled)
  deviation = to_units(mean, common) - to_units(reference, common)
  offset = (count * deviation).sum(axis, keepdims=True) / (
      total + (total == 0))
  merged_mean = reference + (offset if common is None else offset / common)
  merged_m2 = m2.sum(axis, keepdims=True)
  if between:
    merged_m2 = merged_m2 + (count * (deviation - offset) ** 2).sum(
        axis, keepdims=True)
  merged = (total, merged_mean, merged_m2) + tuple(
      v.sum(axis, keepdims=True) for v in pooled)
  return tuple(v.squeeze(axis) for v in merged) + (
      None if common is None else common.squeeze(axis),)


def _common_inverse_unit(count, mean, reference, inv_unit, axis):
  """The merge's ``1 / unit`` (keepdims): the groups' largest unit, raised
  above every mean where the non-empty groups' means spread beyond 2^30."""
  present = count > 0
  common = inv_unit.min(axis, keepdims=True)
  spread = jnp.where(present, jnp.abs(mean - reference), 0).max(
      axis, keepdims=True)
  magnitude = jnp.where(present, jnp.abs(mean), 0).max(axis, keepdims=True)
  wide = spread > math.sqrt(UNIT_FREE_VARIANCE_LIMIT)
  return jnp.where(wide, jnp.minimum(common, inverse_unit(magnitude)), common)


def _take(values, index, axis):
  """``values`` at ``index`` (one per position) along ``axis``, keepdims;
  NumPy stays NumPy, JAX stays JAX."""
  taker = np if isinstance(values, np.ndarray) else jnp
  return taker.take_along_axis(values, taker.expand_dims(index, axis), axis)


def merge_across_devices(count, mean, m2, axis_name, axis_index_groups=None, *,
                         between: bool = True, pooled: tuple = (),
                         inv_unit=None):
  """:func:`merge` of every device's ``(count, mean, M2)``, in one all-reduce
  (an all-gather of the members under ``vmap``, which share a device).

  Each device writes its values into its own slot of a zero buffer and the
  buffer is summed (an all-gather as one psum); ``between``, ``pooled`` and
  ``inv_unit`` (which travels in the same buffer) as for :func:`merge`.
  """
  extra = () if inv_unit is None else (inv_unit,)
  packed = jnp.stack([count, mean, m2, *pooled, *extra])
  if _vmapped(axis_name):
    # vmap's members share one device: the slot buffer would be members x
    # members x channels (270 MB for 256 x 256), the gather is free
    everyone = lax.all_gather(packed, axis_name,
                              axis_index_groups=axis_index_groups)
  else:
    slot, size = device_slot(axis_name, axis_index_groups)
    buffer = jnp.zeros((size,) + packed.shape, packed.dtype)
    buffer = lax.dynamic_update_index_in_dim(buffer, packed, slot, 0)
    everyone = lax.psum(buffer, axis_name,
                        axis_index_groups=axis_index_groups)
  return merge(everyone[:, 0], everyone[:, 1], everyone[:, 2], axis=0,
               between=between,
               pooled=tuple(everyone[:, 3 + i] for i in range(len(pooled))),
               inv_unit=None if inv_unit is None else everyone[:, -1])


def _vmapped(axis_name) -> bool:
  """Whether every name of ``axis_name`` is a ``vmap`` axis (bound, but no
  axis of the trace's mesh: ``shard_map`` and ``pmap`` axes are)."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  mesh_axes = set(jax.sharding.get_abstract_mesh().axis_names)
  return not any(name in mesh_axes for name in names)


def platform_moments(x, reduction_axes, weights=None) -> Triple:
  """The :class:`Triple` in XLA: two passes on CPU, shifted sums elsewhere
  (and everywhere under ``JAXBN_STATISTICS=accelerator``, see ``jaxbn.modes``).

  On GPU/TPU the shifted sums' two reductions are siblings XLA fuses into
  one read; XLA:CPU fuses no siblings, and there the corrected two-pass form
  costs the same two reads.
  """
  axes = tuple(reduction_axes)
  return modes.platform_dependent(
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
  (count, mean, m2), inv_unit = in_units(platform_moments, x,
                                        reduction_axes, weights)
  if axis_name is not None:
    count, mean, m2, inv_unit = merge_across_devices(
        count, mean, m2, axis_name, axis_index_groups, inv_unit=inv_unit)
  return Moments(mean, unscaled_variance(safe_divide(m2, count), inv_unit),
                 count)


def bessel_factor(count: jax.Array) -> jax.Array:
  """``n / (n - 1)``, with 1 for ``n <= 1`` (no division by zero)."""
  return jnp.where(count > 1, count / jnp.maximum(count - 1, 1), 1.0)
