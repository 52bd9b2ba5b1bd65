"""The fast path's passes over the data: a CPU kernel where one applies, XLA
otherwise.

This is the one door to jaxbn's optional CPU kernels (``jaxbn.cpu_kernels``).
Whether they apply to a training call's x is decided once, by :func:`decide`
(mode, device count, dtype, mask, layout, sharding: see
``cpu_kernels.applicable``), and each pass follows that :class:`Where`:

* :func:`moments`: one device's ``(count, mean, M2)`` (keepdims),
* :func:`normalize`: the forward's output pass, and
* :func:`backward`: the closed-form backward's passes (formula in
  ``jaxbn.closed_form``): the sums ``S1 = sum dy`` and ``S2 = sum dy (x -
  mean)`` over the valid elements, combined across devices between the
  passes, then ``dx = a dy + w (c (x - mean) + d)`` (0 in padding), with
  dy gated by a fused ReLU first where there is one.

Where a kernel applies, the platform still chooses (``modes.platform_dependent``:
the kernel on CPU, the same math in XLA on GPU/TPU).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import affine, cpu_kernels, modes, stats


class Where(NamedTuple):
  """Where a training call's passes over x run (:func:`decide`).

  ``axes``: x's reduction axes; ``view``: the CPU kernels' view of x with
  its mask, None for XLA; ``output_view``: the output pass's (rows of
  ``cpu_kernels.WIDE_ROW_CHANNELS`` channels or more), None for XLA.
  """

  axes: tuple
  view: cpu_kernels.ChannelView | None = None
  output_view: cpu_kernels.ChannelView | None = None


def decide(x, reduction_axes, weights=None) -> Where:
  """Where the passes over ``x`` (and its cotangent, of x's dtype) run: the
  one place that asks whether the CPU kernels apply."""
  axes = tuple(reduction_axes)
  view = cpu_kernels.applicable(x, axes, weights)
  # the output pass reads no mask: its view is that of x alone
  plain = view if weights is None else cpu_kernels.applicable(x, axes)
  wide = (plain is not None and plain.b == 1
          and plain.c >= cpu_kernels.WIDE_ROW_CHANNELS)
  return Where(axes, view, plain if wide else None)


def moments(x, reduction_axes, weights=None, *,
            where: Where | None = None) -> stats.Triple:
  """The ``stats.Triple`` of one device's data.

  One read through the kernel on CPU where it applies (``where``, by
  default :func:`decide`'s); otherwise ``stats.platform_moments`` (two XLA
  passes on CPU, shifted sums elsewhere).
  """
  axes = tuple(reduction_axes)
  view = (where or decide(x, axes, weights)).view
  if view is None:
    return stats.platform_moments(x, axes, weights)

  def in_kernel():
    kept = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    mean, m2 = cpu_kernels.moments(x, view, _row_weights(weights, x, view))
    count = stats.reduce_count(x.shape, axes, weights, mean.dtype)
    return stats.Triple(count, mean.reshape(kept), m2.reshape(kept))

  return modes.platform_dependent(
      cpu=in_kernel,
      default=lambda: stats.local_moments_shifted(x, axes, weights))


def normalize(x, mean, a, b, where: Where, activation=None, inv_unit=None):
  """``affine.normalize(x, mean, a, b, activation, inv_unit)`` (per-channel
  values keepdims), through the kernel on CPU for rows of
  ``cpu_kernels.WIDE_ROW_CHANNELS`` channels or more (``where.output_view``);
  in XLA otherwise."""
  view = where.output_view
  in_xla = functools.partial(modes.for_compiler, cpu=functools.partial(
      _normalize_alone, x, mean, a, b, activation, inv_unit), default=
      functools.partial(affine.normalize, x, mean, a, b, activation, inv_unit))
  if view is None:
    return in_xla()

  def in_kernel():
    u = jnp.ones_like(mean) if inv_unit is None else inv_unit
    b_or_0 = jnp.zeros_like(mean) if b is None else b
    terms = _channel_operand((u, stats.to_units(mean, inv_unit), a, b_or_0),
                             mean, view)
    return cpu_kernels.normalize(x, view, terms, relu=activation == "relu")

  return modes.platform_dependent(cpu=in_kernel, default=in_xla)


def _normalize_alone(x, mean, a, b, activation, inv_unit):
  """``affine.normalize`` laid out for XLA:CPU: its inputs (and the ReLU's
  zero) come through a barrier of their own.

  A consumer's reduction (a loss such as ``sum(y * r)``) takes in y's pass
  only if nothing it reads is shared with another pass: XLA:CPU writes out
  in full an elementwise producer that the backward shares (``x - mean``,
  the broadcast scale) and a broadcast constant (the ReLU's zero). Apart,
  the loss reads x and r once and writes nothing."""
  floor = jnp.zeros_like(mean) if activation == "relu" else None
  x, mean, a, b, inv_unit, floor = stats.separate(x, mean, a, b, inv_unit,
                                                  floor)
  return affine.normalize(x, mean, a, b, activation, inv_unit, floor)


class BackwardTerms(NamedTuple):
  """The backward's per-channel inputs (keepdims): the batch's ``mean`` and
  ``variance``, ``scale`` (the total per-channel scale of the normalized
  values), the cotangents ``d_mean`` and ``d_variance`` of the returned
  statistics, the valid elements' ``count``, and ``inv_unit``: None, or per
  channel ``1 / unit`` (``stats.in_units``), with every other term then that
  of ``x / unit``. In the order ``cpu_kernels.backward`` takes them."""

  mean: jax.Array
  variance: jax.Array
  scale: jax.Array
  d_mean: jax.Array
  d_variance: jax.Array
  count: jax.Array
  inv_unit: jax.Array | None = None


def backward(dy, x, weights, terms: BackwardTerms, where: Where, epsilon,
             devices=stats.Devices(), relu=None):
  """``(dx, (S1, S2), (global S1, global S2))``, per-channel sums keepdims.

  With ``terms.inv_unit`` the per-channel terms (and ``relu``'s
  coefficients) are those of ``x / unit`` and so are S2 and the formulas,
  with ``epsilon / unit^2``. The passes then run in units (1 for ordinary
  channels: the same numbers) on every platform, with no conditional: in
  XLA the scaling fuses into the passes; the CPU kernel takes the units too
  (and runs plain loops where one is not 1).

  ``relu``: None, or the forward's ``(a, b)`` when its output went through
  a fused ReLU: ``dy`` reaches the batch norm only where ``(x - mean) a + b
  > 0`` (:func:`affine.relu_gate`), and S1, S2 are sums of that gated dy.
  Without ``devices.axis_name`` the global sums are the local ones, and on
  CPU the whole backward is one kernel call where it applies (gating inside
  its passes): its two passes then run back to back (XLA's breadth-first
  scheduler would put other work between two calls and evict what the
  first pass left in cache). Elsewhere the gate is one more XLA
  elementwise op, fused into the passes on GPU/TPU.
  """
  if devices.axis_name is None and where.view is not None:
    args = (dy, x, weights, terms, relu)
    dx, sum_dy, sum_dy_xc = modes.platform_dependent(
        cpu=functools.partial(_backward_in_one_call, *args, where=where,
                              epsilon=epsilon),
        default=functools.partial(_one_device_backward, *args, where=where,
                                  epsilon=epsilon))
    return dx, (sum_dy, sum_dy_xc), (sum_dy, sum_dy_xc)
  return _backward_in_two_calls(dy, x, weights, terms, where, epsilon,
                                devices, relu)


def _gate(dy, x, mean, relu, inv_unit=None, half=None):
  """dy through the fused ReLU's gate, in dy's dtype (exact): a select
  (``affine.relu_gate``), or with ``half`` (1/2) its product form
  (``affine.relu_gate_product``); with ``inv_unit``, ``mean`` is that of ``x
  / unit``."""
  if relu is None:
    return dy
  if inv_unit is not None:  # relu_gate scales the plain mean (exactly)
    mean = mean / inv_unit
  if half is None:
    return affine.relu_gate(dy, x, mean, *relu, inv_unit).astype(dy.dtype)
  return affine.relu_gate_product(dy, x, mean, *relu, inv_unit,
                                  half).astype(dy.dtype)


def _backward_in_two_calls(dy, x, weights, terms, where, epsilon, devices,
                           relu=None):
  """Two passes over dy and x, the sums combined across devices between
  (with ``terms.inv_unit``: over ``x / unit``, in XLA; see
  :func:`backward`)."""
  mean, inv_unit = terms.mean, terms.inv_unit
  sum_dy, sum_dy_xc = _gradient_sums(dy, x, weights, mean, where, inv_unit,
                                     relu)
  dmean, dvar = terms.d_mean, terms.d_variance
  if devices.axis_name is not None:
    packed = jnp.stack([sum_dy, sum_dy_xc, dmean, dvar])
    packed = lax.psum(packed, devices.axis_name,
                      axis_index_groups=devices.groups)
    g_sum_dy, g_sum_dy_xc, dmean, dvar = packed
  else:
    g_sum_dy, g_sum_dy_xc = sum_dy, sum_dy_xc
  a, c, d = affine.backward_coefficients(
      terms.scale, terms.variance, affine.epsilon_in_units(epsilon, inv_unit),
      (dmean, dvar), (g_sum_dy, g_sum_dy_xc), terms.count)
  dx = _input_gradient(dy, x, weights, (a, c, d, mean), where, inv_unit,
                       relu)
  return dx, (sum_dy, sum_dy_xc), (g_sum_dy, g_sum_dy_xc)


def _one_device_backward(dy, x, weights, terms, relu=None, *, where, epsilon):
  """``(dx, S1, S2)`` on one device, in two calls (``epsilon`` plain)."""
  dx, (sum_dy, sum_dy_xc), _ = _backward_in_two_calls(
      dy, x, weights, terms, where, epsilon, stats.Devices(), relu)
  return dx, sum_dy, sum_dy_xc


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _backward_in_one_call(dy, x, weights, terms, relu, where, epsilon):
  """``_one_device_backward`` as one CPU kernel call (sums shaped like mean).

  Differentiated as ``_one_device_backward``, whose kernels have JVP rules,
  so ``grad`` of ``grad`` works.
  """
  shape = terms.mean.shape
  per_channel = tuple(None if v is None else jnp.broadcast_to(v, shape)
                      for v in terms)
  if relu is not None:
    relu = tuple(jnp.broadcast_to(v, shape) for v in relu)
  view = where.view
  dx, sum_dy, sum_dy_xc = cpu_kernels.backward(
      dy, x, per_channel, view, epsilon, rows=_row_weights(weights, x, view),
      relu=relu)
  return dx, sum_dy.reshape(shape), sum_dy_xc.reshape(shape)


@_backward_in_one_call.defjvp
def _backward_in_one_call_jvp(where, epsilon, primals, tangents):
  return jax.jvp(
      functools.partial(_one_device_backward, where=where, epsilon=epsilon),
      primals, tangents)


def _channel_operand(values, like, view):
  """Per-channel ``values`` (broadcastable to ``like``, keepdims) as the
  kernels' ``(len(values), G * C)`` operand in ``like``'s dtype."""
  return jnp.stack([jnp.broadcast_to(v.astype(like.dtype), like.shape).reshape(
      view.channels) for v in values])


def _row_weights(weights, x, view):
  """The mask as the kernels' row weights (None without a mask)."""
  return (None if weights is None else
          cpu_kernels.row_weights(weights, x.shape, view))


def _gradient_sums(dy, x, weights, mean, where, inv_unit=None, relu=None):
  """``sum(g)`` and ``sum(g * (x - mean))`` per channel (keepdims), over
  the valid (mask nonzero) elements (``x / unit`` for ``x`` with
  ``inv_unit``, in XLA), ``g`` being dy through ``relu``'s gate (see
  :func:`backward`) or dy.

  On CPU one read of ``dy`` and ``x`` through the kernel where it applies
  (no mask); otherwise sibling sums in XLA (``stats.sibling_sums``: one
  read on GPU/TPU, two fast passes on CPU), the gate inside each sum. A
  select is written out in full before an XLA:CPU reduction, so there the
  gate is its product form, and where that leaves a channel non-finite (a
  non-finite dy or x, perhaps behind a closed gate) the channel's sums are
  taken again with the select (:func:`stats.guard_cond`; ordinary steps
  skip it).
  """
  sd = mean.dtype
  valid_rows = None if weights is None else (weights != 0).astype(sd)
  inputs = (dy, x, mean, inv_unit, relu)

  def summands(dy, x, mean, inv_unit, relu, half=None):
    dys = _gate(dy, x, mean, relu, inv_unit, half).astype(sd)
    return dys, dys * (stats.to_units(x.astype(sd), inv_unit) - mean)

  def in_xla(*half):
    return stats.sibling_sums(summands, inputs + half, where.axes,
                              valid_rows)

  def gated_on_cpu():
    # the constant an input: one broadcast constant read by several XLA:CPU
    # sums is written out in full (see stats.sibling_sums)
    return stats.unless_non_finite(
        in_xla(jnp.asarray(0.5, sd)), lambda: stats.sums_in_one_loop(
            summands(*inputs), where.axes, valid_rows))

  view = where.view
  if relu is not None:
    return modes.for_compiler(cpu=gated_on_cpu, default=in_xla)
  if view is None or weights is not None or inv_unit is not None:
    return in_xla()

  def in_kernel():
    sum_dy, sum_dy_xc = cpu_kernels.grad_sums(dy, x, mean, view)
    return sum_dy.reshape(mean.shape), sum_dy_xc.reshape(mean.shape)

  return modes.platform_dependent(cpu=in_kernel, default=in_xla)


def _input_gradient(dy, x, weights, coefficients, where, inv_unit=None,
                    relu=None):
  """``affine.input_gradient`` of dy through ``relu``'s gate: on CPU through
  the kernel where it applies (no mask, no units), which writes big outputs
  with streaming stores; otherwise one XLA elementwise pass, its inputs
  apart on XLA:CPU for the reason given in :func:`_normalize_alone` (a
  loss's reduction over y shares no producer with dx's pass, such as dy's
  float32 copy)."""
  def in_xla(dy, x, weights, coefficients, inv_unit, relu):
    mean = coefficients[3]
    return affine.input_gradient(_gate(dy, x, mean, relu, inv_unit), x,
                                 weights, coefficients, inv_unit)

  args = (dy, x, weights, coefficients, inv_unit, relu)
  view = where.view
  if view is None or inv_unit is not None:
    return modes.for_compiler(cpu=lambda: in_xla(*stats.separate(*args)),
                              default=lambda: in_xla(*args))

  def in_kernel():
    mean = coefficients[3]
    gated = _gate(dy, x, mean, relu, inv_unit)
    per_channel = _channel_operand(coefficients, mean, view)
    return cpu_kernels.input_grad(gated, x, per_channel, view,
                                  rows=_row_weights(weights, x, view))

  return modes.platform_dependent(cpu=in_kernel, default=lambda: in_xla(*args))
