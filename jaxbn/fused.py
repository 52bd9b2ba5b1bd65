"""The fast training path: batch norm as one ``jax.custom_vjp``.

Forward (statistics in float32 or wider, then one elementwise output pass)::

  mean, var = moments(x)            inv = rsqrt(var + epsilon)
  a = gamma * inv
  y = (x - mean) * a + beta

Backward, closed form. With S1 = sum(dy) and S2 = sum(dy * (x - mean)) over
every element (and every device), n the count of valid elements and w the
mask::

  dbeta  = S1                       dgamma = S2 * inv
  dL/dmean = -a * S1 + dmean        dL/dvar = -gamma * inv^3 * S2 / 2 + dvar
  dx = a * dy + w * (c * x + d)     c = 2 dL/dvar / n,  d = dL/dmean / n - c * mean

(dmean, dvar are cotangents of the returned statistics, usually zero.) The only
residuals are ``x`` in its own dtype and per-channel vectors; the normalized
tensor is never saved. Across devices S1, S2 (and dmean, dvar) travel in one
``psum``; parameter gradients stay per-device, as data-parallel training
expects. On CPU, with nothing to combine across devices and no mask, the whole
backward is one kernel call (``cpu_kernels.backward``).

Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) is not defined for a
custom VJP: use ``fused=False`` for it. Reverse-over-reverse (``grad`` of
``grad``) works, since the backward pass is itself differentiable.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jaxbn import cpu_kernels, manual_axes, stats


def _sum(x, axes):
  return jnp.sum(x, axis=axes, keepdims=True)


def _inverse_std(var, epsilon):
  """``rsqrt(var + epsilon)`` in var's dtype (the forward's and backward's)."""
  return lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))


def _forward(x, scale, offset, weights, axes, epsilon, axis_name, groups):
  sd = stats.stat_dtype(x.dtype)
  count, mean, m2 = stats.platform_moments(x, axes, weights)
  if axis_name is not None:
    count, mean, m2 = stats.merge_across_devices(count, mean, m2, axis_name,
                                                 groups)
  var = stats.safe_divide(m2, count)
  mean = checkpoint_name(mean, "jaxbn_batch_mean")
  var = checkpoint_name(var, "jaxbn_batch_variance")
  inv = _inverse_std(var, epsilon)
  y = normalize(x, mean, scale.astype(sd) * inv, offset)
  return y, mean, var, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def normalize_train(x, scale, offset, weights, axes, epsilon, axis_name,
                    groups):
  """Training-mode batch norm with a closed-form backward.

  Args:
    x: input ``[..., C, ...]`` of any float dtype.
    scale, offset: gamma and beta (ones/zeros when absent), broadcastable to x.
    weights: None or 0/1 weights broadcastable to x (the mask).
    axes: the reduction axes (static tuple).
    epsilon: Keras' epsilon.
    axis_name, groups: optional devices to combine statistics over.

  Returns:
    ``(y, mean, variance, count)``; y has x's dtype, the statistics the
    statistics dtype and x's rank (reduced axes kept as 1).
  """
  return _forward(x, scale, offset, weights, axes, epsilon, axis_name, groups)


def _fwd(x, scale, offset, weights, axes, epsilon, axis_name, groups):
  y, mean, var, count = _forward(x, scale, offset, weights, axes, epsilon,
                                 axis_name, groups)
  return (y, mean, var, count), (x, scale, offset, weights, mean, var, count)


def _bwd(axes, epsilon, axis_name, groups, residuals, cotangents):
  x, scale, offset, weights, mean, var, count = residuals
  dy, dmean, dvar, _ = cotangents
  sd = mean.dtype
  gamma = scale.astype(sd)
  inv = _inverse_std(var, epsilon)
  view = None
  if axis_name is None:
    view = cpu_kernels.applicable(x, axes, weights, dy=dy, per_channel=mean)
  if view is None:
    dx, (sum_dy, sum_dy_xc), (g_sum_dy, g_sum_dy_xc) = _backward_in_two_calls(
        dy, x, weights, mean, inv, gamma, dmean, dvar, count, axes, axis_name,
        groups)
  else:
    args = (dy, x, mean, var, gamma, dmean, dvar, count)
    dx, sum_dy, sum_dy_xc = lax.platform_dependent(
        *args,
        cpu=functools.partial(_backward_in_one_call, view=view, axes=axes,
                              epsilon=epsilon),
        default=functools.partial(_one_device_backward, axes=axes,
                                  epsilon=epsilon))
    g_sum_dy, g_sum_dy_xc = sum_dy, sum_dy_xc
  # Inside shard_map, parameters shared by devices (not varying over an axis
  # that x varies over) need their gradient summed over those axes. Over
  # axis_name the global sums are already at hand; any other axis takes a
  # psum, as JAX's own transpose would.
  shared_axes = manual_axes.varying_axes(x) - manual_axes.varying_axes(scale)
  names = frozenset(() if axis_name is None else
                    axis_name if isinstance(axis_name, tuple) else (axis_name,))
  if names and names <= shared_axes:
    sum_dy, sum_dy_xc = g_sum_dy, g_sum_dy_xc
    shared_axes = shared_axes - names
  dscale = _reduce_to(sum_dy_xc * inv, scale)
  doffset = _reduce_to(sum_dy, offset)
  if shared_axes:
    dscale, doffset = lax.psum((dscale, doffset), tuple(sorted(shared_axes)))
  dweights = None if weights is None else jnp.zeros_like(weights)
  return dx, dscale, doffset, dweights


def _backward_in_two_calls(dy, x, weights, mean, inv, gamma, dmean, dvar, count,
                           axes, axis_name, groups):
  """``dx``, the local and the global ``(sum dy, sum dy * (x - mean))``.

  Two passes over dy and x, with the sums combined across devices between
  them when ``axis_name`` is given.
  """
  sum_dy, sum_dy_xc = _gradient_sums(dy, x, mean, axes)
  if axis_name is not None:
    packed = jnp.stack([sum_dy, sum_dy_xc, dmean, dvar])
    packed = lax.psum(packed, axis_name, axis_index_groups=groups)
    g_sum_dy, g_sum_dy_xc, dmean, dvar = packed
  else:
    g_sum_dy, g_sum_dy_xc = sum_dy, sum_dy_xc
  a = gamma * inv
  dl_dmean = -a * g_sum_dy + dmean
  dl_dvar = -0.5 * gamma * inv ** 3 * g_sum_dy_xc + dvar
  c = stats.safe_divide(2.0 * dl_dvar, count)
  d = stats.safe_divide(dl_dmean, count) - c * mean
  dx = _input_gradient(dy, x, weights, a, c, d, axes)
  return dx, (sum_dy, sum_dy_xc), (g_sum_dy, g_sum_dy_xc)


def _one_device_backward(dy, x, mean, var, gamma, dmean, dvar, count, *, axes,
                         epsilon):
  """``(dx, sum dy, sum dy * (x - mean))`` unmasked on one device, two calls."""
  inv = _inverse_std(var, epsilon)
  dx, (sum_dy, sum_dy_xc), _ = _backward_in_two_calls(
      dy, x, None, mean, inv, gamma, dmean, dvar, count, axes, None, None)
  return dx, sum_dy, sum_dy_xc


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9, 10))
def _backward_in_one_call(dy, x, mean, var, gamma, dmean, dvar, count, view,
                          axes, epsilon):
  """``_one_device_backward`` as one CPU kernel call (sums shaped like mean).

  Differentiated as ``_one_device_backward``, whose kernels have JVP rules.
  """
  per_channel = tuple(jnp.broadcast_to(v, mean.shape)
                      for v in (mean, var, gamma, dmean, dvar, count))
  dx, sum_dy, sum_dy_xc = cpu_kernels.backward(dy, x, per_channel, view,
                                               epsilon)
  return dx, sum_dy.reshape(mean.shape), sum_dy_xc.reshape(mean.shape)


@_backward_in_one_call.defjvp
def _backward_in_one_call_jvp(view, axes, epsilon, primals, tangents):
  del view
  return jax.jvp(
      functools.partial(_one_device_backward, axes=axes, epsilon=epsilon),
      primals, tangents)


def _gradient_sums(dy, x, mean, axes):
  """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel (keepdims).

  On CPU one read of ``dy`` and ``x`` through the kernel where it applies;
  otherwise two XLA reductions, each with its own copy of its inputs (see
  ``stats.separate``).
  """
  sd = mean.dtype

  def in_xla():
    dy_for_sum, dy_for_dot, x_for_dot, mean_for_dot = stats.separate(
        dy, dy, x, mean)
    return (_sum(dy_for_sum.astype(sd), axes),
            _sum(dy_for_dot.astype(sd)
                 * (x_for_dot.astype(sd) - mean_for_dot), axes))

  view = cpu_kernels.applicable(x, axes, dy=dy, per_channel=mean)
  if view is None:
    return in_xla()

  def in_kernel():
    sum_dy, sum_dy_xc = cpu_kernels.grad_sums(dy, x, mean, view)
    return sum_dy.reshape(mean.shape), sum_dy_xc.reshape(mean.shape)

  return lax.platform_dependent(cpu=in_kernel, default=in_xla)


def _input_gradient(dy, x, weights, a, c, d, axes):
  """``dx = a * dy + w * (c * x + d)`` in the statistics dtype, cast to x's.

  On CPU through the kernel where it applies (no mask), which writes big
  outputs with streaming stores; otherwise one XLA elementwise pass.
  """
  sd = d.dtype

  def in_xla():
    correction = c * x.astype(sd) + d
    if weights is not None:
      correction = weights.astype(sd) * correction
    return (a * dy.astype(sd) + correction).astype(x.dtype)

  view = cpu_kernels.applicable(x, axes, weights, dy=dy, per_channel=d)
  if view is None:
    return in_xla()

  def in_kernel():
    coefficients = jnp.stack(
        [jnp.broadcast_to(v, d.shape).reshape(view.c) for v in (a, c, d)])
    return cpu_kernels.input_grad(dy, x, coefficients, view)

  return lax.platform_dependent(cpu=in_kernel, default=in_xla)


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


normalize_train.defvjp(_fwd, _bwd)


def normalize(x, mean, a, b):
  """``y = (x - mean) * a + b`` in the statistics dtype, cast back to x's.

  One elementwise pass with per-channel ``mean``, ``a = gamma * rsqrt(var +
  eps)`` and ``b = beta``. Subtracting the mean first (rather than folding it
  into ``b - mean * a``, as Keras does) costs one flop and no memory traffic,
  and keeps the output exact to float rounding of *y* when |mean| >> std: the
  folded form errs by ~ulp(mean) * a, which is 1.0 for a constant channel at
  5e15 and 1e-3 for float32 data with mean 1e4 and std 1.
  """
  sd = stats.stat_dtype(x.dtype)
  y = (x.astype(sd) - mean.astype(sd)) * a.astype(sd)
  if b is not None:
    y = y + b.astype(sd)
  return y.astype(x.dtype)
