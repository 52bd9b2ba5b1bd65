"""``BatchNormalization``: a thin Flax Linen layer over the functional core.

Variables use Keras' names: ``params/gamma``, ``params/beta``,
``batch_stats/moving_mean``, ``batch_stats/moving_variance`` (and the renorm
statistics). Training updates need ``mutable=['batch_stats']``::

  model = jaxbn.BatchNormalization(momentum=0.9)
  variables = model.init(key, x)                       # nothing is updated
  y, updates = model.apply(variables, x, training=True,
                           mutable=['batch_stats'])
  y = model.apply({**variables, **updates}, x)         # inference
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import core
from jaxbn.config import (BatchNormConfig, cached_when_hashable,
                          check_param_dtype, check_partition_names,
                          check_training, state_names)

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(BatchNormConfig))


@cached_when_hashable(maxsize=256)
def _built_config(arguments: tuple) -> BatchNormConfig:
  return BatchNormConfig(**{f: v for f, (_, v) in zip(CONFIG_FIELDS,
                                                       arguments)})


def _config_attributes(namespace: dict) -> None:
  """Adds every ``BatchNormConfig`` field, with its type and default, to a
  class body: a new Keras argument is declared once, in the config."""
  annotations = namespace.setdefault("__annotations__", {})
  for field in dataclasses.fields(BatchNormConfig):
    annotations[field.name] = field.type
    namespace[field.name] = field.default


class BatchNormalization(nn.Module):
  """Keras' ``BatchNormalization`` as a Linen module (same arguments).

  Attributes: every field of ``jaxbn.BatchNormConfig`` (Keras' arguments and
  defaults), plus ``axis_name``/``axis_index_groups`` for cross-device
  statistics (ignored during ``init``, so a model can be initialized outside
  ``pmap``/``shard_map``).

  Call: ``layer(x, training=None, mask=None)``; ``training=None`` means
  inference. ``trainable=False`` means inference even with ``training=True``.
  The RNG stream ``'adjustment'`` feeds ``adjustment(shape, key)``.

  ``dtype`` is the output's dtype (None: the input's) and ``param_dtype``
  that of ``gamma`` and ``beta``, as in flax's layers; the statistics are
  computed, and the moving statistics kept, in float32 (float64 for float64
  parameters) whatever they are.

  ``partition_names``: one mesh axis name (or None) per dimension of the
  variables, e.g. ``('model',)`` to shard the channels over ``model``:
  every variable is then boxed as ``nn.with_partitioning`` boxes it, so
  ``nn.get_partition_spec(variables)`` gives its ``PartitionSpec``.
  """

  _config_attributes(vars())  # axis, momentum, ... as in BatchNormConfig
  axis_name: Any = None
  axis_index_groups: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  partition_names: Optional[Sequence[Optional[str]]] = None

  @property
  def config(self) -> BatchNormConfig:
    """The layer's ``BatchNormConfig``, built and validated once for each
    set of arguments (a Linen module is rebuilt on every ``apply``)."""
    # typed: equal values of different types (1 and 1.0) are told apart
    return _built_config(tuple((type(v), v) for v in (
        getattr(self, f) for f in CONFIG_FIELDS)))

  def get_config(self) -> dict:
    """Keras' ``get_config()`` dict for this layer."""
    return self.config.get_config()

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *,
                  built: Optional[bool] = None, **overrides
                  ) -> "BatchNormalization":
    """Builds the layer from a Keras layer config (``layer.get_config()``,
    built or not; see ``BatchNormConfig.from_config`` for ``built``)."""
    parsed = BatchNormConfig.from_config(config, built=built)
    fields = {f: getattr(parsed, f) for f in CONFIG_FIELDS}
    if parsed.renorm_clipping is not None:
      fields["renorm_clipping"] = parsed.renorm_clipping.as_dict()
    fields.update(overrides)
    return cls(**fields)

  @nn.compact
  def __call__(self, x: jax.Array, training: Optional[bool] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    config = self.config
    param_shape = core.variable_shape(config, jnp.shape(x))
    check_param_dtype(self.param_dtype)
    names = check_partition_names(self.partition_names, param_shape)
    boxed = ((lambda init: init) if names is None
             else (lambda init: nn.with_partitioning(init, names)))
    params = {}
    if config.scale:
      params["gamma"] = self.param(
          "gamma",
          boxed(lambda k, s: config.gamma_initializer(k, s, self.param_dtype)),
          param_shape)
    if config.center:
      params["beta"] = self.param(
          "beta",
          boxed(lambda k, s: config.beta_initializer(k, s, self.param_dtype)),
          param_shape)
    entries = state_names(config)
    initial = {}
    if not self.has_variable("batch_stats", entries[0]):
      key = self.make_rng("params") if self.has_rng("params") else None
      initial = core.init_state(config, param_shape, key=key,
                                dtype=self.param_dtype)
    variables = {n: self.variable("batch_stats", n,
                                  boxed(lambda n=n: initial[n]))
                 for n in entries}
    state = {n: v.value for n, v in variables.items()}

    training = check_training(training)
    updates = training and config.trainable and not self.is_initializing()
    if updates and not self.is_mutable_collection("batch_stats"):
      raise ValueError(
          "training=True updates the moving statistics in 'batch_stats': "
          "call model.apply(variables, x, training=True, "
          "mutable=['batch_stats']) and keep the returned updates.")
    key = None
    if (config.adjustment is not None and training
        and self.has_rng("adjustment")):
      key = self.make_rng("adjustment")
    initializing = self.is_initializing()
    y, new_state = core.apply(
        config, params, state, x, training=training, key=key,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        mask=mask)
    if updates:
      for name, variable in variables.items():
        variable.value = new_state[name]
    return y if self.dtype is None else y.astype(self.dtype)


def replace_batch_norm(**jaxbn_args):
  """A context in which every ``flax.linen.BatchNorm`` of an existing model
  runs through jaxbn, on flax's variables and with flax's semantics, plus
  ``jaxbn_args`` (e.g. ``renorm=True``)::

    with jaxbn.linen.replace_batch_norm(virtual_batch_size=8):
      y, updates = model.apply(variables, x, mutable=['batch_stats'])

  See ``jaxbn.interop.flax_models``."""
  from jaxbn.interop import flax_models
  return flax_models.replace_linen_batch_norm(**jaxbn_args)
