"""Training-mode batch norm as one ``jax.custom_vjp`` with a closed-form backward.

Every Keras feature runs through this one function: renorm's ``(r, d)`` come
from ``correction`` (computed from the batch statistics, without gradient),
``adjustment`` is folded into ``scale``/``offset`` by the caller, virtual
batches are a view of ``x`` with one more kept axis, and masks are
``weights``. Forward (statistics in float32 or wider, then one elementwise
output pass)::

  mean, var = moments(x)            inv = rsqrt(var + epsilon)
  r, d, extras = correction(mean, var, count)      (r = 1, d = 0 without one)
  y = (x - mean) * inv * r * scale + d * scale + offset    (= (x - mean) a + b)

and, with ``activation='relu'``, ``max(y, 0)``.

Backward, closed form. With ``g = scale * r`` (the total scale of the
normalized values), ``a = g * inv``, S1 = sum(dy) and S2 = sum(dy * (x -
mean)) over every valid element (and every device), n their count and w the
mask::

  doffset = S1                      dscale = r * inv * S2 + d * S1
  dL/dmean = -a * S1 + dmean        dL/dvar = -g * inv^3 * S2 / 2 + dvar
  dx = a * dy + w * (c * x + d')    c = 2 dL/dvar / n,  d' = dL/dmean / n - c * mean

Masked-out elements are padding: they are normalized like the rest (as in
Keras 3 and flax.linen) but their outputs are constants of the parameters
and the input (dx = 0 there, and they add nothing to S1 and S2), so whatever
the padding holds, NaN included, never reaches a statistic or a gradient.

(dmean, dvar are cotangents of the returned statistics, usually zero.) A
channel whose statistics the overflow guard took in units (``stats.in_units``:
a spread beyond 2^30) runs all of the above for ``x / unit``, with
``epsilon / unit^2``; its returned variance is in plain units, saturated at
float32's maximum. With
the ReLU, dy is first gated (0 where ``(x - mean) a + b <= 0``), recomputed
from x inside the backward's passes. The only
residuals are ``x`` in its own dtype and per-channel vectors; the normalized
tensor is never saved. Across devices S1, S2 (and dmean, dvar) travel in one
``psum``; parameter gradients stay per-device, as data-parallel training
expects. The passes over the data are ``jaxbn.passes``' (a CPU kernel where one
applies).

:func:`reference` is the same forward without the custom VJP, in XLA alone:
plain autodiff differentiates it (``fused=False``, forward mode included), and
tests compare the two.

Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) is not defined for a
custom VJP: :func:`train` runs :func:`reference` under it. Reverse-over-reverse
(``grad`` of ``grad``) works, since the backward pass is itself
differentiable.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jaxbn import affine, modes, passes, stats


class TrainingPlan(NamedTuple):
  """What a training call resolved before touching the data (static).

  ``axes``: x's reduction axes; ``epsilon``: Keras' epsilon; ``devices``:
  the devices the statistics are combined over (``stats.Devices``);
  ``correction``: None, or ``(batch, correction_inputs) -> (r, d, extras)``
  with ``batch`` the normalization's ``stats.InUnits`` statistics: ``r``/``d``
  (None for identity) correct the normalized values without gradient,
  ``extras`` is returned as is (stopped gradient); ``activation``: None or
  ``'relu'`` (applied to the output).
  """

  axes: tuple
  epsilon: float
  devices: stats.Devices = stats.Devices()
  correction: Callable | None = None
  activation: str | None = None


def _forward(x, scale, offset, weights, correction_inputs,
             plan: TrainingPlan, fast):
  """The forward; ``fast``: its passes over x through ``jaxbn.passes`` (a
  CPU kernel where one applies), else in XLA alone (the reference)."""
  sd = stats.stat_dtype(x.dtype)
  epsilon, devices = plan.epsilon, plan.devices
  if fast:  # where the passes run: decided once for the call
    where = passes.decide(x, plan.axes, weights)
    local_moments = functools.partial(passes.moments, where=where)
  else:
    local_moments = stats.platform_moments
  (count, mean, m2), inv_unit = stats.in_units(local_moments, x, plan.axes,
                                               weights)
  if devices.axis_name is not None:
    count, mean, m2, inv_unit = stats.merge_across_devices(
        count, mean, m2, devices.axis_name, devices.groups, inv_unit=inv_unit)
  var = stats.safe_divide(m2, count)  # in units of unit^2
  mean = checkpoint_name(mean, "jaxbn_batch_mean")
  var = checkpoint_name(var, "jaxbn_batch_variance")
  r, d, extras = (None, None, None) if plan.correction is None else (
      plan.correction(stats.InUnits(count, mean, var, inv_unit),
                      correction_inputs))
  scale = scale.astype(sd)
  a = scale * affine.inverse_std(var,
                                 affine.epsilon_in_units(epsilon, inv_unit))
  b = offset
  if r is not None:
    a = a * r
  if d is not None:
    b = b + d * scale
  if fast:
    y = passes.normalize(x, mean, a, b, where, plan.activation, inv_unit)
  else:
    y = affine.normalize(x, mean, a, b, plan.activation, inv_unit)
  statistics = (mean, stats.unscaled_variance(var, inv_unit), count)
  return (y, statistics, extras), (r, d, a, b, var, inv_unit)



def reference(x, scale, offset, weights, correction_inputs,
              plan: TrainingPlan):
  """:func:`batch_norm_train` by plain autodiff, statistics in XLA alone."""
  if weights is None:
    outputs, _ = _forward(x, scale, offset, weights, correction_inputs, plan,
                          fast=False)
    return outputs
  # Padding enters the differentiated program as 0 (autodiff would multiply
  # a NaN there by a zero cotangent); its outputs are added as constants.
  (y, statistics, extras), (_, _, a, b, _, inv_unit) = _forward(
      stats.where_valid(weights, x), scale, offset, weights,
      correction_inputs, plan, fast=False)
  padding = lax.stop_gradient(
      affine.normalize(x, statistics[0], a, b, plan.activation, inv_unit))
  return jnp.where(weights != 0, y, padding), statistics, extras


def train(*args):
  """:func:`batch_norm_train`, or :func:`reference` (the same forward by
  plain autodiff: exact, derivatives of every order) where forward-mode
  autodiff (``jax.jvp``, ``jacfwd``, the outer ``jacfwd`` of ``hessian``)
  traces the call, which a custom VJP does not support."""
  return (reference if modes.carries_tangents(args)
          else batch_norm_train)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def batch_norm_train(x, scale, offset, weights, correction_inputs,
                     plan: TrainingPlan):
  """Training-mode batch norm with a closed-form backward.

  Args:
    x: input ``[..., C, ...]`` of any float dtype.
    scale, offset: the affine map after normalization (gamma and beta, with
      any adjustment folded in), broadcastable to the statistics' shape.
    weights: None or 0/1 weights broadcastable to x (the mask).
    correction_inputs: arrays ``plan.correction`` reads (renorm's
      averages); they get zero gradient.
    plan: the reduction axes, epsilon, devices, correction and activation
      (:class:`TrainingPlan`).

  Returns:
    ``(y, (mean, variance, count), extras)``; y has x's dtype, the
    statistics the statistics dtype and x's rank (reduced axes kept as 1).
  """
  outputs, _ = _forward(x, scale, offset, weights, correction_inputs, plan,
                        fast=True)
  return outputs


def _fwd(x, scale, offset, weights, correction_inputs, plan):
  outputs, (r, d, a, b, var, inv_unit) = _forward(
      x, scale, offset, weights, correction_inputs, plan, fast=True)
  _, (mean, _, count), _ = outputs
  relu = (a, b) if plan.activation == "relu" else None
  return outputs, (x, scale, offset, weights, correction_inputs, mean, var,
                   count, r, d, relu, inv_unit)


def _bwd(plan, residuals, cotangents):
  epsilon, axis_name = plan.epsilon, plan.devices.axis_name
  (x, scale, offset, weights, correction_inputs, mean, var, count, r, d, relu,
   inv_unit) = residuals
  dy, (dmean, dvar, _), _ = cotangents
  sd = mean.dtype
  total_scale = scale.astype(sd) if r is None else scale.astype(sd) * r
  # the backward of the problem in units: x / unit, whose statistics are
  # mean / unit and var (already in units), their cotangents scaled back
  if inv_unit is not None:
    unit = 1 / inv_unit
    mean, dmean, dvar = mean * inv_unit, dmean * unit, dvar * unit * unit
  terms = passes.BackwardTerms(mean, var, total_scale, dmean, dvar, count,
                               inv_unit)
  where = passes.decide(x, plan.axes, weights)  # as the forward decided
  dx, (sum_dy, sum_dy_xc), (g_sum_dy, g_sum_dy_xc) = passes.backward(
      dy, x, weights, terms, where, epsilon, plan.devices, relu)
  # Inside shard_map, parameters shared by devices (not varying over an axis
  # that x varies over) need their gradient summed over those axes. Over
  # axis_name the global sums are already at hand; any other axis takes a
  # psum, as JAX's own transpose would.
  shared_axes = modes.varying_axes(x) - modes.varying_axes(scale)
  names = frozenset(() if axis_name is None else
                    axis_name if isinstance(axis_name, tuple) else (axis_name,))
  if names and names <= shared_axes:
    sum_dy, sum_dy_xc = g_sum_dy, g_sum_dy_xc
    shared_axes = shared_axes - names
  inv = affine.inverse_std(var, affine.epsilon_in_units(epsilon, inv_unit))
  dscale = sum_dy_xc * inv if r is None else sum_dy_xc * inv * r
  if d is not None:
    dscale = dscale + sum_dy * d
  dscale = _reduce_to(dscale, scale)
  doffset = _reduce_to(sum_dy, offset)
  if shared_axes:
    dscale, doffset = lax.psum((dscale, doffset), tuple(sorted(shared_axes)))
  dweights = None if weights is None else jnp.zeros_like(weights)
  dinputs = jax.tree.map(jnp.zeros_like, correction_inputs)
  return dx, dscale, doffset, dweights, dinputs


def _reduce_to(value, like):
  """Sums ``value`` down to ``like``'s (broadcastable) shape and dtype."""
  extra = value.ndim - like.ndim
  if extra:
    value = jnp.sum(value, axis=tuple(range(extra)))
  axes = tuple(i for i, (v, l) in enumerate(zip(value.shape, like.shape))
               if l == 1 and v != 1)
  if axes:
    value = jnp.sum(value, axis=axes, keepdims=True)
  return value.astype(like.dtype)


batch_norm_train.defvjp(_fwd, _bwd)
