"""Existing Flax models, unchanged: their batch norms run through jaxbn.

* Linen: ``with jaxbn.linen.replace_batch_norm(**jaxbn_args): model.apply(...)``
  (a method interceptor) runs every ``flax.linen.BatchNorm`` through jaxbn,
  on flax's own variables (``scale``, ``bias``, ``mean``, ``var``: checkpoints
  load as they are) and with flax's semantics (its momentum, epsilon,
  ``use_running_average``, ``axis_name``, mask, biased moving variance).
* NNX: ``jaxbn.nnx.replace_batch_norm(model, **jaxbn_args)`` replaces the
  ``nnx.BatchNorm`` submodules of a model in place with jaxbn's NNX layer,
  carrying their parameters, statistics and mode.

``jaxbn_args`` are jaxbn's arguments added on top (``renorm=True``,
``virtual_batch_size=...``, ``moving_variance_estimator='keras'``, ...);
state they need beyond flax's (renorm's averages) lives in ``batch_stats``
under jaxbn's names. The flax names map onto jaxbn's as ``scale -> gamma``,
``bias -> beta``, ``mean -> moving_mean``, ``var -> moving_variance``.
"""
from __future__ import annotations

import contextlib
import functools
import jax.numpy as jnp

from jaxbn import core
from jaxbn.config import BatchNormConfig, state_names

FLAX_NAMES = {"gamma": "scale", "beta": "bias", "moving_mean": "mean",
              "moving_variance": "var"}


def flax_config(bn, **jaxbn_args) -> BatchNormConfig:
  """The jaxbn config of a flax batch norm (Linen or NNX): its axis,
  momentum, epsilon, bias and scale, and its biased moving variance, with
  ``jaxbn_args`` on top."""
  axis = bn.axis if isinstance(bn.axis, int) else tuple(bn.axis)
  if not isinstance(axis, int) and len(axis) == 1:
    axis = axis[0]
  args = dict(axis=axis, momentum=float(bn.momentum),
              epsilon=float(bn.epsilon), center=bool(bn.use_bias),
              scale=bool(bn.use_scale), moving_variance_estimator="biased")
  return BatchNormConfig(**{**args, **jaxbn_args})


def _check_args(jaxbn_args):
  fields = set(BatchNormConfig.__dataclass_fields__)
  unknown = sorted(set(jaxbn_args) - fields)
  if unknown:
    raise TypeError(f"replace_batch_norm got unknown jaxbn arguments "
                    f"{unknown}; it takes BatchNormConfig's: {sorted(fields)}.")
  BatchNormConfig(**jaxbn_args)  # every other argument error, now


# ------------------------------------------------------------------- Linen


@contextlib.contextmanager
def replace_linen_batch_norm(**jaxbn_args):
  """Within the context, every ``flax.linen.BatchNorm`` call runs through
  jaxbn (see the module docstring)."""
  import flax.linen as nn
  _check_args(jaxbn_args)

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm)
        and context.method_name == "__call__"):
      return _linen_call(context.module, jaxbn_args, *args, **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _linen_call(bn, jaxbn_args, x, use_running_average=None, *, mask=None):
  """A ``flax.linen.BatchNorm`` call through ``jaxbn.apply``, on the module's
  own variables."""
  import flax.linen as nn
  training = not nn.merge_param("use_running_average",
                                bn.use_running_average, use_running_average)
  config = flax_config(bn, **jaxbn_args)
  x = jnp.asarray(x)
  resolved = config.resolve(x.shape)
  feature_shape = tuple(x.shape[a] for a in resolved.axes)
  stat_dtype = (jnp.float32 if getattr(bn, "force_float32_reductions", True)
                else bn.param_dtype)
  params = {}
  if config.scale:
    params["gamma"] = bn.param("scale", bn.scale_init, feature_shape,
                               bn.param_dtype)
  if config.center:
    params["beta"] = bn.param("bias", bn.bias_init, feature_shape,
                              bn.param_dtype)
  variables = {
      "moving_mean": bn.variable("batch_stats", "mean", jnp.zeros,
                                 feature_shape, stat_dtype),
      "moving_variance": bn.variable("batch_stats", "var", jnp.ones,
                                     feature_shape, stat_dtype)}
  # jaxbn's initial state, built once, when its first entry is created
  whole = functools.cache(lambda: core.init_state(
      config, resolved.param_shape, dtype=stat_dtype))
  initial = lambda name: whole()[name]
  for name in state_names(config):
    if name not in variables:  # jaxbn's own state (renorm, accumulation)
      variables[name] = bn.variable("batch_stats", name, initial, name)
  shape = resolved.param_shape
  params = {n: v.reshape(shape) for n, v in params.items()}
  state = {n: v.value.reshape(shape) if n in FLAX_NAMES else v.value
           for n, v in variables.items()}
  initializing = bn.is_initializing()
  y, new_state = core.apply(
      config, params, state, x, training=training,
      axis_name=None if initializing else bn.axis_name,
      axis_index_groups=None if initializing else bn.axis_index_groups,
      mask=as_jaxbn_mask(mask, x))
  if training and not initializing:
    for name, variable in variables.items():
      variable.value = new_state[name].reshape(jnp.shape(variable.value))
  return y if bn.dtype is None else y.astype(bn.dtype)


def as_jaxbn_mask(mask, x):
  """flax's mask (broadcastable to x, aligned on the trailing axes) as
  jaxbn's (x's rank, 1 along the axes it does not vary over)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  return mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)


# --------------------------------------------------------------------- NNX


def replace_nnx_batch_norm(model, **jaxbn_args):
  """Replaces, in place, every ``nnx.BatchNorm`` inside ``model`` with
  jaxbn's NNX layer carrying its variables (under jaxbn's names) and mode;
  returns ``model`` (a model that is itself an ``nnx.BatchNorm`` is
  returned replaced)."""
  from flax import nnx
  _check_args(jaxbn_args)
  if isinstance(model, nnx.BatchNorm):
    return _nnx_layer(model, jaxbn_args)
  _replace_within(model, jaxbn_args, nnx)
  return model


def _replace_within(node, jaxbn_args, nnx):
  containers = (list, tuple, dict, nnx.List, nnx.Dict)
  if isinstance(node, (list, tuple, nnx.List)):
    children = list(enumerate(node))
  elif isinstance(node, (dict, nnx.Dict)):
    children = list(node.items())
  else:
    children = list(vars(node).items())
  for key, child in children:
    if isinstance(child, nnx.BatchNorm):
      replacement = _nnx_layer(child, jaxbn_args)
      if isinstance(node, tuple):
        raise TypeError("an nnx.BatchNorm inside a tuple cannot be replaced "
                        "in place; hold the layers in a list or nnx.List.")
      if isinstance(node, containers):
        node[key] = replacement
      else:
        setattr(node, key, replacement)
    elif isinstance(child, (nnx.Module,) + containers):
      _replace_within(child, jaxbn_args, nnx)


def _nnx_layer(bn, jaxbn_args):
  from flax import nnx

  from jaxbn import nnx as jaxbn_nnx
  config = flax_config(bn, **jaxbn_args)
  if not isinstance(config.axis, int):
    raise ValueError(f"nnx.BatchNorm with axis={bn.axis!r}: jaxbn's NNX layer "
                     "takes one axis here; replace it by hand with "
                     "input_rank=.")
  fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
  layer = jaxbn_nnx.BatchNormalization(
      bn.num_features, axis_name=bn.axis_name,
      axis_index_groups=bn.axis_index_groups,
      use_running_average=bool(bn.use_running_average), dtype=bn.dtype,
      param_dtype=bn.param_dtype, rngs=nnx.Rngs(0), **fields)
  for jaxbn_name, flax_name in FLAX_NAMES.items():
    source = getattr(bn, flax_name, None)
    if hasattr(layer, jaxbn_name) and isinstance(source, nnx.Variable):
      getattr(layer, jaxbn_name)[...] = source[...]
  return layer

