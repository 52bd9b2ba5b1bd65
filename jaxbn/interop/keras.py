"""Keras (tf_keras and Keras 3) BatchNormalization layers <-> jaxbn."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxbn.linen import BatchNormalization

_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance",
              "moving_stddev", "renorm_mean", "renorm_stddev")
_PARAMS = ("gamma", "beta")


def _short_name(variable) -> str:
  name = getattr(variable, "path", None) or variable.name
  return name.split("/")[-1].split(":")[0]


def _is_batch_norm(layer) -> bool:
  return type(layer).__name__ in ("BatchNormalization",
                                  "BatchNormalizationV1",
                                  "BatchNormalizationV2")


def _our_shape(keras_shape, module: BatchNormalization):
  """Keras' variable shape without the virtual-batch axis (jaxbn's shape)."""
  shape = list(keras_shape)
  if module.virtual_batch_size is not None:
    del shape[1]
    single = isinstance(module.axis, int) or len(module.axis) == 1
    if single:
      shape = [math.prod(shape)]
  return tuple(shape)


def from_keras(layer) -> tuple[BatchNormalization, dict]:
  """``(module, variables)`` equal to a built Keras BatchNormalization layer.

  Works for tf_keras (Keras 2) and Keras 3 layers: the config (Keras' keys)
  builds the module and every weight (renorm statistics included) goes into
  ``{'params': {...}, 'batch_stats': {...}}`` in jaxbn's shapes.
  """
  if not _is_batch_norm(layer):
    raise TypeError(f"from_keras expects a Keras BatchNormalization layer; "
                    f"got {type(layer).__name__}.")
  if getattr(layer, "adjustment", None) is not None:
    raise ValueError(
        "The Keras layer has an `adjustment` callable, which Keras does not "
        "serialize and which computes in TensorFlow: rebuild it in JAX and "
        "pass it, e.g. module.clone(adjustment=fn).")
  config = dict(layer.get_config())
  config.pop("synchronized", None)
  if "axis" in config and not isinstance(config["axis"], int):
    axis = list(config["axis"])
    if config.get("virtual_batch_size") is not None:
      # tf_keras shifts the axes by one for the virtual-batch axis at build
      axis = [a - 1 if a > 0 else a for a in axis]
    config["axis"] = axis[0] if len(axis) == 1 else axis
  module = BatchNormalization.from_config(config)
  variables = {"params": {}, "batch_stats": {}}
  for variable in layer.weights:
    name = _short_name(variable)
    if name not in _VARIABLES:
      continue
    value = np.asarray(variable.numpy() if hasattr(variable, "numpy")
                       else variable, np.float32)
    collection = "params" if name in _PARAMS else "batch_stats"
    variables[collection][name] = value.reshape(_our_shape(value.shape,
                                                           module))
  return module, variables


def keras_model_variables(model) -> dict[str, Any]:
  """Every BatchNormalization layer of a Keras model as Flax variables.

  Returns ``{'params': {layer_name: {...}}, 'batch_stats': {layer_name:
  {...}}}``; name the jaxbn layers of the Flax model like the Keras layers to
  use it directly.
  """
  out = {"params": {}, "batch_stats": {}}
  for layer in _walk(model):
    if _is_batch_norm(layer):
      _, variables = from_keras(layer)
      for collection in out:
        out[collection][layer.name] = variables[collection]
  return out


def _walk(layer):
  for sub in getattr(layer, "layers", []):
    yield sub
    yield from _walk(sub)


def to_keras(module: BatchNormalization, variables, input_shape):
  """A built tf_keras layer with ``module``'s config and ``variables``."""
  import tf_keras
  layer = tf_keras.layers.BatchNormalization.from_config(module.get_config())
  layer.build(tuple(input_shape))
  flat = {**variables.get("params", {}), **variables.get("batch_stats", {})}
  for variable in layer.weights:
    name = _short_name(variable)
    if name in flat:
      variable.assign(np.asarray(flat[name]).reshape(variable.shape))
  return layer
