"""Regularizers and constraints with Keras' names, defaults and numbers.

A regularizer maps a parameter to a scalar penalty that the user adds to the
loss (Keras adds it to ``layer.losses``). A constraint maps a parameter to its
projection, applied after each optimizer update. Keras applies both to its own
variable shape; jaxbn's parameter shapes equal Keras' except that virtual
batches add no singleton axis, which ``keras_view_shape`` restores.

Formulas (``eps = 1e-7``, norms over ``axis`` with ``keepdims``)::

  L1L2(l1, l2)(w)      = l1 * sum|w| + l2 * sum w^2
  NonNeg(w)            = w * (w >= 0)
  UnitNorm(axis)(w)    = w / (eps + ||w||)
  MaxNorm(m, axis)(w)  = w * clip(||w||, 0, m) / (eps + ||w||)
  MinMaxNorm(lo, hi, rate, axis)(w)
                       = w * (rate * clip(||w||, lo, hi) + (1 - rate) * ||w||)
                           / (eps + ||w||)
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxbn import keras_names

KERAS_EPSILON = 1e-7

REGULARIZERS = {
    "l1": ("L1", {"l1": 0.01}),
    "l2": ("L2", {"l2": 0.01}),
    "l1_l2": ("L1L2", {"l1": 0.01, "l2": 0.01}),
}

CONSTRAINTS = {
    "non_neg": ("NonNeg", {}),
    "unit_norm": ("UnitNorm", {"axis": 0}),
    "max_norm": ("MaxNorm", {"max_value": 2, "axis": 0}),
    "min_max_norm": ("MinMaxNorm", {"min_value": 0.0, "max_value": 1.0,
                                    "rate": 1.0, "axis": 0}),
}


class Regularizer(keras_names.KerasObject):
  """``l1 * sum|w| + l2 * sum w^2`` (Keras' L1, L2 and L1L2)."""

  keras_module = "keras.regularizers"

  def __call__(self, w: jax.Array) -> jax.Array:
    cfg = self.config
    # Keras stores the factors as float32; so do we, for equal penalties.
    l1 = jnp.float32(cfg.get("l1", 0.0))
    l2 = jnp.float32(cfg.get("l2", 0.0))
    w = jnp.asarray(w, jnp.float32)
    penalty = jnp.zeros((), jnp.float32)
    if cfg.get("l1", 0.0):
      # sign(w) * w is |w| with TensorFlow's subgradient 0 at w = 0 (jnp.abs
      # has 1 there), so L1 training steps match Keras at zero-initialized beta.
      penalty += l1 * jnp.sum(jnp.sign(w) * w)
    if cfg.get("l2", 0.0):
      penalty += l2 * jnp.sum(jnp.square(w))
    return penalty


class Constraint(keras_names.KerasObject):
  """Keras' NonNeg, UnitNorm, MaxNorm and MinMaxNorm projections."""

  keras_module = "keras.constraints"

  @property
  def elementwise(self) -> bool:
    """Whether it acts on each value alone (so any shape of the variable
    gives the same result)."""
    return self.class_name == "NonNeg"

  def __call__(self, w: jax.Array) -> jax.Array:
    cfg = self.config
    if self.class_name == "NonNeg":
      return w * (w >= 0).astype(w.dtype)
    axis = cfg["axis"]
    axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
    norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))
    if self.class_name == "UnitNorm":
      return w / (KERAS_EPSILON + norms)
    if self.class_name == "MaxNorm":
      desired = jnp.clip(norms, 0, cfg["max_value"])
    else:
      rate = cfg["rate"]
      desired = (rate * jnp.clip(norms, cfg["min_value"], cfg["max_value"])
                 + (1 - rate) * norms)
    return w * (desired / (KERAS_EPSILON + norms))


def get_regularizer(value: Any, argument: str):
  return keras_names.resolve(
      value, argument=argument, registry=REGULARIZERS, kind="regularizer",
      factory=lambda n, c: Regularizer(n, keras_names.frozen_items(c)))


def get_constraint(value: Any, argument: str):
  return keras_names.resolve(
      value, argument=argument, registry=CONSTRAINTS, kind="constraint",
      factory=lambda n, c: Constraint(n, keras_names.frozen_items(c)))


# --------------------------------------------------------------------------
# Per layer


def _config_of(config_or_module):
  config = getattr(config_or_module, "config", config_or_module)
  if not hasattr(config, "gamma_regularizer"):
    raise TypeError(
        "Expected a jaxbn.BatchNormConfig or a jaxbn layer; got "
        f"{type(config_or_module).__name__}.")
  return config


def unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Bare params from either bare params or a Linen variables dict."""
  if "params" in params and isinstance(params["params"], Mapping):
    return params["params"]
  return params


def regularization_loss(config_or_module, params: Mapping[str, Any]
                        ) -> jax.Array:
  """The layer's penalty: ``gamma_regularizer(gamma) + beta_regularizer(beta)``.

  Equals the sum of a Keras layer's ``layer.losses``.
  """
  config = _config_of(config_or_module)
  params = unwrap_params(params)
  total = jnp.zeros((), jnp.float32)
  for name, reg in (("gamma", config.gamma_regularizer),
                    ("beta", config.beta_regularizer)):
    if reg is not None and name in params:
      total = total + reg(params[name])
  return total


def keras_view_shape(config, shape: tuple, input_rank: int | None) -> tuple:
  """The shape Keras gives this variable (virtual batches add an axis 1)."""
  if config.virtual_batch_size is None:
    return tuple(shape)
  if len(shape) > 1:  # axis list: already the full broadcast shape
    return (shape[0], 1) + tuple(shape[1:])
  if input_rank is None:
    raise ValueError(
        "Keras applies constraints of a `virtual_batch_size` layer to a "
        "variable of the input's rank + 1; pass `input_rank=` (the rank of the "
        "layer's input) to apply_constraints, or use jaxbn.collect_layers, "
        "which records it.")
  axis = config.axis if isinstance(config.axis, int) else config.axis[0]
  axis = axis % input_rank
  view = [1] * (input_rank + 1)
  view[axis + 1] = shape[0]
  return tuple(view)


def apply_constraints(config_or_module, params: Mapping[str, Any], *,
                      input_rank: int | None = None) -> dict:
  """Returns ``params`` with ``gamma_constraint``/``beta_constraint`` applied.

  Constraints act on Keras' variable shape (see ``keras_view_shape``), so
  axis-based constraints project exactly what Keras projects; ``input_rank``
  is needed only for those of a ``virtual_batch_size`` layer.
  """
  config = _config_of(config_or_module)
  params = dict(unwrap_params(params))
  for name, constraint in (("gamma", config.gamma_constraint),
                           ("beta", config.beta_constraint)):
    if constraint is None or name not in params:
      continue
    value = params[name]
    if getattr(constraint, "elementwise", False):
      params[name] = constraint(value)
      continue
    view = keras_view_shape(config, value.shape, input_rank)
    params[name] = constraint(value.reshape(view)).reshape(value.shape)
  return params
