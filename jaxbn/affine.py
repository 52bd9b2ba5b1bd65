"""Per-channel affine maps: the normalization pass and the composition of
the corrections applied to the normalized values.

``normalize`` is the one elementwise pass of inference and of the training
forward (which ``jaxbn.passes.normalize`` runs as a CPU kernel for wide
rows); ``compose`` folds renorm's ``(r, d)`` and ``adjustment``'s ``(scale,
bias)`` into gamma and beta, as Keras' ``_compose_transforms``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import stats


def inverse_std(var: jax.Array, epsilon: float) -> jax.Array:
  """``rsqrt(var + epsilon)`` in var's dtype (forward and backward share it),
  0 where ``var + epsilon`` is 0: a constant channel with ``epsilon=0``
  normalizes to beta (its ``x - mean`` is 0) instead of 0 * inf = NaN."""
  total = var + jnp.asarray(epsilon, var.dtype)
  # rsqrt(inf) = 0, and the rsqrt last: XLA:CPU forms an expensive op once
  # per channel rather than in the passes it feeds, and the select before
  # it goes with it (fused into the output pass, it would be recomputed there
  # per element, reading every vector it comes from)
  return lax.rsqrt(jnp.where(total == 0, jnp.inf, total))


def epsilon_in_units(epsilon, inv_unit: jax.Array | None):
  """Keras' epsilon in the units of a variance in units of ``unit^2``
  (``stats.in_units``): ``epsilon / unit^2``, exactly ``epsilon`` for 1 (or
  None: no units)."""
  if inv_unit is None:
    return epsilon
  return jnp.asarray(epsilon, inv_unit.dtype) * inv_unit * inv_unit


def stddev(variance, epsilon, inv_unit: jax.Array | None = None):
  """``sqrt(v + epsilon)`` in plain units for ``variance`` in units of
  ``unit^2`` (``v = variance unit^2``), formed in units: finite for any
  spread within float32's range, where ``v`` itself saturates beyond a
  spread of about 1.8e19 (``stats.unscaled_variance``)."""
  root = jnp.sqrt(variance + epsilon_in_units(epsilon, inv_unit))
  return root if inv_unit is None else root / inv_unit


def normalize(x, mean, a, b, activation=None, inv_unit=None, floor=None):
  """``y = (x - mean) * a + b`` in the statistics dtype, cast back to x's;
  with ``activation='relu'``, ``max(y, 0)`` before the cast (0 given per
  channel as ``floor``, or a constant: the same values). With
  ``inv_unit`` (``1 / unit``, a power of two per channel: see
  ``stats.in_units``), ``y = (x / unit - mean / unit) * a + b``, ``a`` being
  in the same units: exact scalings (by 1 for an ordinary channel).

  One elementwise pass with per-channel ``mean``, ``a = gamma * rsqrt(var +
  eps)`` and ``b = beta``. Subtracting the mean first (rather than folding it
  into ``b - mean * a``, as Keras does) costs one flop and no memory traffic,
  and keeps the output exact to float rounding of *y* when |mean| >> std: the
  folded form errs by ~ulp(mean) * a, which is 1.0 for a constant channel at
  5e15 and 1e-3 for float32 data with mean 1e4 and std 1.
  """
  y = _normalized(x, mean, a, b, inv_unit)
  if activation == "relu":
    y = jax.nn.relu(y) if floor is None else jnp.maximum(y, floor)
  return y.astype(x.dtype)


def _normalized(x, mean, a, b, inv_unit=None):
  """``(x - mean) * a + b`` in the statistics dtype (before any cast)."""
  sd = stats.stat_dtype(x.dtype)
  x = stats.to_units(x.astype(sd), inv_unit)
  mean = stats.to_units(mean.astype(sd), inv_unit)
  y = (x - mean) * a.astype(sd)
  if b is not None:
    y = y + b.astype(sd)
  return y


def relu_gate(dy, x, mean, a, b, inv_unit=None):
  """The cotangent of ``normalize(x, mean, a, b, 'relu', inv_unit)`` from
  that of its ReLU: ``dy`` where the normalized value is > 0, else 0
  (``jax.nn.relu``'s rule), the normalized value recomputed exactly as
  ``normalize`` computes it. In the statistics dtype."""
  z = _normalized(x, mean, a, b, inv_unit)
  return jnp.where(z > 0, dy.astype(z.dtype), 0)


def relu_gate_product(dy, x, mean, a, b, inv_unit=None, half=0.5):
  """:func:`relu_gate` in arithmetic alone: ``dy * (s + s^2) half`` with ``s
  = sign(z)`` and ``half = 1/2`` (an argument, so that it may come as an
  input), a factor 1 where ``z > 0`` and a zero elsewhere.

  The same values wherever ``dy`` and ``z`` are finite. A non-finite ``dy``
  behind a closed gate (or a NaN ``z``) gives NaN where :func:`relu_gate`
  gives 0, so a caller checks what it sums (``passes``). Unlike the select,
  XLA:CPU's reduction fusions take it in: a sum of it reads dy and x once,
  with nothing written out."""
  z = _normalized(x, mean, a, b, inv_unit)
  s = jnp.sign(z)
  return dy.astype(z.dtype) * ((s + s * s) * half)


def backward_coefficients(scale, variance, epsilon, cotangents, sums, count):
  """``(a, c, d)`` of the closed-form input gradient ``dx = a dy + w (c (x -
  mean) + d)`` (formula in ``jaxbn.closed_form``), per channel.

  ``scale`` is the total scale of the normalized values, ``cotangents`` the
  ``(d_mean, d_variance)`` of the returned statistics, ``sums`` the global
  ``(S1, S2) = (sum dy, sum dy (x - mean))`` and ``count`` the valid
  elements' (c = d = 0 where it is 0). The CPU kernel's ``ComputeBackward``
  forms the same in double.
  """
  d_mean, d_variance = cotangents
  sum_dy, sum_dy_xc = sums
  inv = inverse_std(variance, epsilon)
  a = scale * inv
  dl_dmean = -a * sum_dy + d_mean
  dl_dvar = -0.5 * scale * inv ** 3 * sum_dy_xc + d_variance
  return (a, stats.safe_divide(2.0 * dl_dvar, count),
          stats.safe_divide(dl_dmean, count))


def input_gradient(dy, x, weights, coefficients, inv_unit=None):
  """``dx = a dy + w (c (x - mean) + d)`` with ``coefficients = (a, c, d,
  mean)`` per channel (:func:`backward_coefficients`), in their dtype, cast
  to x's; 0 in padding (``w == 0``), whatever it holds. Centred on the mean
  as the forward is: ``c x + (d - c mean)`` cancels where ``|mean| >>
  std``. With ``inv_unit``: that of ``x / unit`` (``mean`` in units), times
  ``1 / unit`` (the gradient with respect to x)."""
  a, c, d, mean = coefficients
  sd = d.dtype
  correction = c * (stats.to_units(x.astype(sd), inv_unit) - mean) + d
  if weights is not None:
    correction = weights.astype(sd) * correction
  dx = stats.where_valid(weights, a * dy.astype(sd) + correction)
  return stats.to_units(dx, inv_unit).astype(x.dtype)


def compose(scale, offset, then_scale, then_offset):
  """The affine map ``z -> (z * scale + offset) * then_scale + then_offset``.

  ``None`` stands for the identity factor/term (Keras' ``_compose_transforms``).
  """
  if then_scale is not None:
    scale = scale * then_scale
    offset = offset * then_scale
  if then_offset is not None:
    offset = offset + then_offset
  return scale, offset
