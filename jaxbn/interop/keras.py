"""Keras (tf_keras and Keras 3) BatchNormalization layers <-> jaxbn."""
from __future__ import annotations

import dataclasses
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


def from_keras(layer, *, name: str | None = None
               ) -> tuple[BatchNormalization, dict]:
  """``(module, variables)`` equal to a Keras BatchNormalization layer.

  Works for tf_keras (Keras 2) and Keras 3 layers, built or not: the config
  (Keras' keys) builds the module and every weight (renorm statistics
  included) goes into ``{'params': {...}, 'batch_stats': {...}}`` in jaxbn's
  shapes. The moving variance follows the layer's own rule: a built tf_keras
  layer's ``fused`` as Keras decided it at build (Bessel-corrected when
  fused; ``get_config()`` omits it), an unbuilt one's ``fused`` argument,
  Keras 3's biased variance always. ``name`` names the module (for placing
  it in a parent by name).
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
  # tf_keras only (a Keras 3 config says 'biased' itself, see from_config)
  fused = getattr(layer, "fused", None)
  if fused is not None and layer.built:
    config["moving_variance_estimator"] = "unbiased" if fused else "biased"
  elif fused is not None:
    config["fused"] = bool(fused)
  module = BatchNormalization.from_config(config, built=bool(layer.built),
                                          name=name)
  variables = {"params": {}, "batch_stats": {}}
  for variable in layer.weights:
    short = _short_name(variable)
    if short not in _VARIABLES:
      continue
    value = np.asarray(variable.numpy() if hasattr(variable, "numpy")
                       else variable, np.float32)
    collection = "params" if short in _PARAMS else "batch_stats"
    variables[collection][short] = value.reshape(_our_shape(value.shape,
                                                            module))
  return module, variables


def keras_config(module: BatchNormalization, input_shape) -> dict:
  """A tf_keras config with ``module``'s numbers for inputs of ``input_shape``.

  ``module.get_config()`` carries jaxbn's own keys, which Keras rejects.
  Here ``moving_variance_estimator`` becomes Keras' ``fused`` flag where one
  expresses it: ``'biased'`` is ``fused=False`` (wherever Keras would
  otherwise run its fused, Bessel-correcting kernel), ``'unbiased'`` is
  ``fused=True`` on 4-D/5-D inputs with channel axis 1 or last and no renorm
  or virtual batches. Anything else Keras cannot express raises ValueError.
  """
  config = module.config
  resolved = config.resolve(tuple(input_shape))
  keras = module.get_config()
  for key in ("moving_variance_estimator", "virtual_batch_layout",
              "skip_nonfinite_updates", "activation"):
    keras.pop(key, None)
  if config.activation is not None:
    raise ValueError(
        f"activation={config.activation!r} has no tf_keras BatchNormalization "
        "equivalent; export module.clone(activation=None) and put a "
        "tf.keras.layers.ReLU() after the layer (the same numbers).")
  unbiased = config.bessel_corrected_moving_variance(resolved)
  if unbiased != resolved.keras_fused:
    if not unbiased:
      keras["fused"] = False
    elif _keras_would_fuse(config, input_shape):
      keras["fused"] = True
    else:
      raise ValueError(
          f"moving_variance_estimator={config.moving_variance_estimator!r} "
          "(a Bessel-corrected moving variance) has no tf_keras equivalent "
          f"for input shape {tuple(input_shape)} with axis={config.axis!r}: "
          "Keras corrects only in its fused kernel (4-D/5-D input, channel "
          "axis 1 or last, no renorm or virtual batches). Use "
          "module.clone(moving_variance_estimator='biased') to export Keras' "
          "non-fused rule (moving variances then differ from this module's).")
  if config.virtual_batch_layout != "strided":
    raise ValueError(
        "virtual_batch_layout='contiguous' has no tf_keras equivalent (Keras "
        "takes every (batch / virtual_batch_size)-th row); use "
        "module.clone(virtual_batch_layout='strided') and reorder the batch.")
  if config.skip_nonfinite_updates:
    raise ValueError(
        "skip_nonfinite_updates=True has no tf_keras equivalent; use "
        "module.clone(skip_nonfinite_updates=False) to export (Keras then "
        "lets a non-finite batch into the moving statistics).")
  return keras


def _keras_would_fuse(config, input_shape) -> bool:
  """Whether Keras accepts ``fused=True`` for this config and input."""
  try:
    fused = dataclasses.replace(config, fused=True,
                                moving_variance_estimator="keras")
    return fused.resolve(tuple(input_shape)).keras_fused
  except ValueError:
    return False


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
  """A built tf_keras layer with ``module``'s numbers and ``variables``
  (config by :func:`keras_config`, which raises what Keras cannot express)."""
  import tf_keras
  layer = tf_keras.layers.BatchNormalization.from_config(
      keras_config(module, input_shape))
  layer.build(tuple(input_shape))
  flat = {**variables.get("params", {}), **variables.get("batch_stats", {})}
  for variable in layer.weights:
    name = _short_name(variable)
    if name in flat:
      variable.assign(np.asarray(flat[name]).reshape(variable.shape))
  return layer
