"""``jaxbn.nnx.BatchNormalization``: a Flax NNX layer over the same core.

Parameters are ``nnx.Param`` (``gamma``, ``beta``) and the moving statistics
``nnx.BatchStat`` (``moving_mean``, ``moving_variance``, + renorm statistics),
with Keras' names. The math is ``jaxbn.apply``; this module only holds the
variables::

  bn = jaxbn.nnx.BatchNormalization(64, momentum=0.9, rngs=nnx.Rngs(0))
  y = bn(x, training=True)      # updates the BatchStat variables
  bn.eval(); y = bn(x)          # training=None follows train()/eval()
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
from flax import nnx

from jaxbn import core, initializers
from jaxbn.config import (BatchNormConfig, check_param_dtype,
                          check_partition_names, check_training, state_names)


class BatchNormalization(nnx.Module):
  """Keras' ``BatchNormalization`` as an NNX module.

  Args:
    num_features: channel count, or one count per axis for an axis list.
    input_rank: rank of the inputs; needed when the variable shape depends on
      it (an axis list, whose variables have Keras' full-rank shape, or a
      negative axis in a list).
    axis_name: devices to combine statistics over.
    axis_index_groups: optional device groups for ``axis_name``.
    use_running_average: the module's mode (``eval()`` sets it True); a call
      with ``training=None`` trains when it is False.
    rngs: ``nnx.Rngs``; its ``params`` stream feeds random initializers and an
      ``adjustment`` stream, if present, feeds ``adjustment``.
    dtype: the output's dtype (None: the input's), as in flax's layers.
    param_dtype: the dtype of ``gamma`` and ``beta``; the statistics and the
      moving statistics are float32 (float64 for float64 parameters)
      whatever it is.
    partition_names: one mesh axis name (or None) per dimension of the
      variables, e.g. ``('model',)``: every variable carries it as its
      ``sharding_names`` metadata (flax's ``scale_metadata`` convention;
      as for flax's layers, create the layer under ``jax.set_mesh``).
    **kwargs: every ``jaxbn.BatchNormConfig`` argument (Keras' names).
  """

  def __init__(self, num_features: Union[int, Sequence[int]], *,
               input_rank: Optional[int] = None, axis_name=None,
               axis_index_groups=None, use_running_average: bool = False,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               partition_names: Optional[Sequence[Optional[str]]] = None,
               rngs: nnx.Rngs, **kwargs):
    self.config = BatchNormConfig(**kwargs)
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_running_average = use_running_average
    self.dtype = dtype
    shape = example_shape(self.config, num_features, input_rank)
    check_param_dtype(param_dtype)
    param_shape = core.variable_shape(self.config, shape)
    params, state = _initial_variables(self.config, param_shape, param_dtype,
                                       rngs)
    names = check_partition_names(partition_names, param_shape)
    metadata = {} if names is None else {"sharding_names": names}
    for name, value in params.items():
      setattr(self, name, nnx.Param(value, **metadata))
    for name, value in state.items():
      setattr(self, name, nnx.BatchStat(value, **metadata))
    self.rngs = rngs if "adjustment" in rngs else None

  def __call__(self, x, training: Optional[bool] = None, mask=None):
    if training is None:
      training = not self.use_running_average
    training = check_training(training)
    params = {n: getattr(self, n)[...] for n in ("gamma", "beta")
              if hasattr(self, n)}
    state = {n: getattr(self, n)[...] for n in state_names(self.config)}
    key = None
    if training and self.config.adjustment is not None and self.rngs:
      key = self.rngs.adjustment()
    y, new_state = core.apply(self.config, params, state, x,
                              training=training, key=key,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups,
                              mask=mask)
    if training and self.config.trainable:
      for name, value in new_state.items():
        getattr(self, name)[...] = value
    return y if self.dtype is None else y.astype(self.dtype)


def _initial_variables(config, param_shape, param_dtype, rngs):
  """``(params, state)``, drawing from ``rngs.params`` as ``nnx.BatchNorm``
  does: one key for gamma (scale), then one for beta (bias), and none for
  the moving statistics unless an initializer of theirs is random; swapping
  one layer for the other leaves every later layer's initialization as
  it was."""
  params = {}
  for name, present, initializer in (
      ("gamma", config.scale, config.gamma_initializer),
      ("beta", config.center, config.beta_initializer)):
    if present:
      params[name] = initializer(rngs.params(), param_shape, param_dtype)
  random_statistics = not all(
      initializers.is_constant(i) for i in (config.moving_mean_initializer,
                                            config.moving_variance_initializer))
  state = core.init_state(config, param_shape, dtype=param_dtype,
                          key=rngs.params() if random_statistics else None)
  return params, state


def example_shape(config, num_features, input_rank):
  """An input shape with the right rank and channel sizes (others 1)."""
  axes = (config.axis,) if isinstance(config.axis, int) else config.axis
  sizes = ((num_features,) if isinstance(num_features, int)
           else tuple(num_features))
  if len(sizes) != len(axes):
    raise ValueError(
        f"`num_features`={num_features!r} must give one size per channel axis "
        f"(axis={config.axis!r}).")
  if input_rank is None:
    if len(axes) > 1:
      raise ValueError(
          f"axis={config.axis!r} gives variables of the input's rank (Keras' "
          "shape): pass `input_rank=`.")
    # one channel axis: the variables are (C,) whatever the rank
    input_rank = max(2, axes[0] + 1 if axes[0] >= 0 else -axes[0])
  shape = [1] * input_rank
  for axis, size in zip(axes, sizes):
    if not -input_rank <= axis < input_rank:
      raise ValueError(f"axis {axis} is out of range for input_rank="
                       f"{input_rank}.")
    shape[axis] = size
  if config.virtual_batch_size is not None:
    shape[0] = config.virtual_batch_size
  return tuple(shape)


def replace_batch_norm(model, **jaxbn_args):
  """Replaces every ``nnx.BatchNorm`` of ``model`` in place with this layer,
  carrying its parameters, statistics and mode (flax's momentum, epsilon
  and biased moving variance, plus ``jaxbn_args``); returns the model. See
  ``jaxbn.interop.flax_models``."""
  from jaxbn.interop import flax_models
  return flax_models.replace_nnx_batch_norm(model, **jaxbn_args)


__all__ = ["BatchNormalization", "replace_batch_norm"]
