"""jaxbn for Equinox: Keras' ``BatchNormalization`` as an ``eqx.Module``.

Parameters ``gamma``/``beta`` are fields; the moving statistics live in an
``eqx.nn.State`` (one ``eqx.nn.StateIndex`` holding jaxbn's state dict), as
``eqx.nn.BatchNorm`` keeps its own::

  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNormalization)(
      64, momentum=0.9, key=key)
  y, state = bn(x, state, training=True)    # x: (batch, ..., 64)

Equinox's per-example style (each example alone under ``jax.vmap``, the
statistics over the vmapped axis) is ``per_example=True`` with the vmap's
``axis_name``; the channel axis then counts from the example's axes
(``axis=0`` for Equinox's channels-first ``(C, H, W)`` examples)::

  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNormalization)(
      64, axis=0, axis_name="batch", per_example=True)
  y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                      out_axes=(0, None))(x, state)

``eqx.nn.inference_mode`` switches the layer to inference (its ``inference``
field), as it does ``eqx.nn.BatchNorm``. Every call runs ``jaxbn.apply``: the
numbers are the functional core's. Needs ``pip install jaxbn[equinox]``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jaxbn import core, optional
from jaxbn.config import BatchNormConfig, check_training
from jaxbn.nnx import example_shape

eqx = optional.require("equinox")


class BatchNormalization(eqx.Module):
  """Keras' ``BatchNormalization`` (every ``jaxbn.BatchNormConfig``
  argument) as an Equinox module with its statistics in ``eqx.nn.State``.

  Args:
    num_features: channel count, or one count per axis for an axis list.
    input_rank: the inputs' rank, needed for an axis list (Keras' full-rank
      variables); with ``per_example`` the examples' rank.
    axis_name: the named axis (``vmap``, ``pmap``,
    axis_index_groups: optional device groups for ``axis_name``.
      ``shard_map``) to take the statistics over.
    per_example: the layer sees one example at a time (no batch axis) under
      ``jax.vmap(..., axis_name=axis_name)``, Equinox's style; the channel
      ``axis`` counts from the example's axes.
    inference: the layer's mode; ``eqx.nn.inference_mode`` sets it. A call
      with ``training=None`` trains when it is False.
    dtype: the output's dtype (None: the input's).
    param_dtype: the dtype of ``gamma`` and ``beta``; the moving statistics
      are float32 (float64 for float64 parameters).
    key: PRNG key for random initializers (None for Keras' defaults).
    **kwargs: every ``jaxbn.BatchNormConfig`` argument (Keras' names).
  """

  gamma: Optional[jax.Array]
  beta: Optional[jax.Array]
  state_index: eqx.nn.StateIndex
  inference: bool
  config: BatchNormConfig = eqx.field(static=True)
  # the config for inputs with a batch axis: with ``per_example`` the
  # example's axes count from 1 in the batch of one the layer normalizes
  batch_config: BatchNormConfig = eqx.field(static=True)
  axis_name: Optional[Hashable] = eqx.field(static=True)
  axis_index_groups: Any = eqx.field(static=True)
  per_example: bool = eqx.field(static=True)
  dtype: Any = eqx.field(static=True)

  def __init__(self, num_features: Union[int, Sequence[int]], *,
               input_rank: Optional[int] = None, axis_name=None,
               axis_index_groups=None, per_example: bool = False,
               inference: bool = False, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               key: Optional[jax.Array] = None, **kwargs):
    self.config = BatchNormConfig(**kwargs)
    if per_example and axis_name is None:
      raise ValueError(
          "per_example=True takes the statistics over the examples of a vmap: "
          "pass its axis_name (jax.vmap(..., axis_name='batch') and "
          "axis_name='batch').")
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.per_example = bool(per_example)
    self.inference = bool(inference)
    self.dtype = dtype
    self.batch_config = _batch_config(self.config, self.per_example)
    config = self.batch_config
    rank = None if input_rank is None else input_rank + self.per_example
    shape = example_shape(config, num_features, rank)
    params, state = core.init(config, shape, key=key, dtype=param_dtype)
    self.gamma = params.get("gamma")
    self.beta = params.get("beta")
    self.state_index = eqx.nn.StateIndex(state)

  def __call__(self, x: jax.Array, state: eqx.nn.State,
               training: Optional[bool] = None, *,
               key: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None,
               inference: Optional[bool] = None
               ) -> tuple[jax.Array, eqx.nn.State]:
    """``(y, state)``: ``x`` normalized, and the state with the moving
    statistics updated in training.

    ``training`` (or Equinox's ``inference``, its negation) overrides the
    layer's mode; ``key`` feeds ``adjustment``; ``mask`` as for
    ``jaxbn.apply`` (with ``per_example``, the example's).
    """
    if training is None:
      training = not (self.inference if inference is None else inference)
    training = check_training(training)
    params = {n: v for n, v in (("gamma", self.gamma), ("beta", self.beta))
              if v is not None}
    stats = state.get(self.state_index)
    if self.per_example:
      x = jnp.asarray(x)[None]
      mask = None if mask is None else jnp.asarray(mask)[None]
    y, new_stats = core.apply(self.batch_config, params, stats, x,
                              training=training, key=key,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups,
                              mask=mask)
    if self.per_example:
      y = y[0]
    if training and self.config.trainable:
      state = state.set(self.state_index, new_stats)
    return (y if self.dtype is None else y.astype(self.dtype)), state


def _batch_config(config: BatchNormConfig, per_example: bool
                  ) -> BatchNormConfig:
  if not per_example:
    return config
  shift = lambda a: a + 1 if a >= 0 else a
  axis = (shift(config.axis) if isinstance(config.axis, int)
          else tuple(shift(a) for a in config.axis))
  return dataclasses.replace(config, axis=axis)


def from_equinox(bn, state) -> tuple[BatchNormalization, eqx.nn.State]:
  """``(layer, state)`` from an ``eqx.nn.BatchNorm`` and its state.

  The layer has Equinox's momentum, epsilon, affine parameters, biased
  moving variance and axis name, and takes its examples as Equinox does
  (``per_example=True``, channels first: ``axis=0``). Its moving statistics
  are what the Equinox layer normalizes with in inference: mode ``'ema'``'s
  averages (its initial 0/1 before any training step), mode ``'batch'``'s
  zero-debiased ones. Inference is then identical. In training jaxbn
  normalizes with the batch statistics, as Equinox's ``'batch'`` mode does
  (its ``'ema'`` mode normalizes with the running averages), and updates a
  plain EMA of them.
  """
  if not isinstance(bn, eqx.nn.BatchNorm):
    raise TypeError(f"from_equinox expects eqx.nn.BatchNorm; got "
                    f"{type(bn).__name__}.")
  if bn.mode == "ema":
    first_time = state.get(bn.ema_first_time_index)
    mean, var = state.get(bn.ema_state_index)
    mean = jnp.where(first_time, 0.0, mean)
    var = jnp.where(first_time, 1.0, var)
  else:
    counter = state.get(bn.batch_counter)
    hidden_mean, hidden_var = state.get(bn.batch_state_index)
    scale = jnp.where(counter == 0, 1, 1 - bn.momentum ** counter)
    mean, var = hidden_mean / scale, hidden_var / scale
  affine = bool(bn.channelwise_affine)
  layer, new_state = eqx.nn.make_with_state(BatchNormalization)(
      bn.input_size, axis=0, axis_name=bn.axis_name, per_example=True,
      inference=bn.inference, momentum=float(bn.momentum),
      epsilon=float(bn.eps), center=affine, scale=affine,
      moving_variance_estimator="biased")
  if affine:
    layer = eqx.tree_at(lambda m: (m.gamma, m.beta), layer,
                        (jnp.asarray(bn.weight, jnp.float32),
                         jnp.asarray(bn.bias, jnp.float32)))
  stats = dict(new_state.get(layer.state_index))
  stats["moving_mean"] = jnp.asarray(mean, jnp.float32)
  stats["moving_variance"] = jnp.asarray(var, jnp.float32)
  return layer, new_state.set(layer.state_index, stats)


__all__ = ["BatchNormalization", "from_equinox"]
