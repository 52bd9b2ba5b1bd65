"""Keras (tf_keras and Keras 3) BatchNormalization layers <-> jaxbn."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxbn import optional
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


TARGETS = ("tf_keras", "keras3")


def keras_config(module: BatchNormalization, input_shape,
                 target: str = "tf_keras") -> dict:
  """A Keras config with ``module``'s numbers for inputs of ``input_shape``.

  ``module.get_config()`` carries jaxbn's own keys, which Keras rejects.
  ``target='tf_keras'`` (Keras 2): ``moving_variance_estimator`` becomes
  Keras' ``fused`` flag where one expresses it: ``'biased'`` is
  ``fused=False`` (wherever Keras would otherwise run its fused,
  Bessel-correcting kernel), ``'unbiased'`` is ``fused=True`` on 4-D/5-D
  inputs with channel axis 1 or last and no renorm or virtual batches.
  ``target='keras3'``: Keras 3's arguments (no ``fused``, no virtual batches
  or ``adjustment``; its moving variance is never Bessel-corrected, so the
  module's must not be either). Anything the target cannot express raises
  ValueError naming the fix.
  """
  if target not in TARGETS:
    raise ValueError(f"`target` must be one of {TARGETS}; got {target!r}.")
  config = module.config
  resolved = config.resolve(tuple(input_shape))
  keras = module.get_config()
  for key in ("moving_variance_estimator", "virtual_batch_layout",
              "skip_nonfinite_updates", "activation", "fused",
              "accumulation_steps"):
    keras.pop(key, None)
  # the axes of the input, as an unbuilt Keras layer takes them
  keras["axis"] = config.axis if isinstance(config.axis, int) else list(
      config.axis)
  name = "tf_keras" if target == "tf_keras" else "Keras 3"
  if config.activation is not None:
    raise ValueError(
        f"activation={config.activation!r} has no {name} BatchNormalization "
        "equivalent; export module.clone(activation=None) and put a "
        "ReLU layer after the layer (the same numbers).")
  if config.accumulation_steps != 1:
    raise ValueError(
        f"accumulation_steps={config.accumulation_steps} has no {name} "
        "equivalent (Keras updates the moving statistics on every call); "
        "export module.clone(accumulation_steps=1): inference is the same.")
  if config.skip_nonfinite_updates:
    raise ValueError(
        f"skip_nonfinite_updates=True has no {name} equivalent; use "
        "module.clone(skip_nonfinite_updates=False) to export (Keras then "
        "lets a non-finite batch into the moving statistics).")
  unbiased = resolved.bessel
  if target == "keras3":
    return _keras3_config(config, keras, unbiased, input_shape)
  if config.fused is not None:
    keras["fused"] = config.fused
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
  return keras


def _keras3_config(config, keras, unbiased, input_shape) -> dict:
  """``keras`` (a jaxbn config without jaxbn's keys) for Keras 3."""
  if config.virtual_batch_size is not None:
    raise ValueError(
        "virtual_batch_size (Ghost Batch Normalization) has no Keras 3 "
        "equivalent; export to tf_keras (target='tf_keras') or train with "
        "module.clone(virtual_batch_size=None).")
  axes = (config.axis,) if isinstance(config.axis, int) else config.axis
  if len(axes) != 1:
    raise ValueError(
        f"axis={config.axis!r}: a Keras 3 BatchNormalization takes one "
        "channel axis; export to tf_keras (target='tf_keras'), which takes "
        "an axis list.")
  if unbiased:
    raise ValueError(
        f"This module's moving variance is Bessel-corrected for input shape "
        f"{tuple(input_shape)} (moving_variance_estimator="
        f"{config.moving_variance_estimator!r}), which Keras 3 never does. "
        "Use module.clone(moving_variance_estimator='biased') to export Keras "
        "3's rule (inference numbers are the same).")
  keras["axis"] = axes[0]
  # Keras 3's own mark (its dtype policy): BatchNormConfig.from_config then
  # reads the config as Keras 3's, whose moving variance is never corrected
  keras["dtype"] = {"module": "keras", "class_name": "DTypePolicy",
                    "config": {"name": "float32"}, "registered_name": None}
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


def to_keras(module: BatchNormalization, variables, input_shape,
             target: str = "tf_keras"):
  """A built Keras layer (tf_keras, or Keras 3 with ``target='keras3'``)
  with ``module``'s numbers and ``variables`` (config by
  :func:`keras_config`, which raises what the target cannot express)."""
  config = keras_config(module, input_shape, target)
  if target == "keras3":
    keras = optional.require("keras")
    layer = keras.layers.BatchNormalization.from_config(config)
  else:
    tf_keras = optional.require("tf_keras")
    layer = tf_keras.layers.BatchNormalization.from_config(config)
  layer.build(tuple(input_shape))
  flat = {**variables.get("params", {}), **variables.get("batch_stats", {})}
  for variable in layer.weights:
    name = _short_name(variable)
    if name in flat:
      variable.assign(np.asarray(flat[name]).reshape(variable.shape))
  return layer
