"""Keras-named initializers backed by ``jax.nn.initializers``.

Every initializer here has the ``jax.nn.initializers`` signature
``init(key, shape, dtype) -> array``; any callable with that signature is also
accepted wherever jaxbn takes an initializer. Random initializers draw from
JAX's PRNG, so their values differ from Keras' (same distributions).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import keras_names

# snake-case name -> (Keras class name, default config)
REGISTRY = {
    "zeros": ("Zeros", {}),
    "ones": ("Ones", {}),
    "constant": ("Constant", {"value": 0.0}),
    "random_normal": ("RandomNormal", {"mean": 0.0, "stddev": 0.05,
                                       "seed": None}),
    "random_uniform": ("RandomUniform", {"minval": -0.05, "maxval": 0.05,
                                         "seed": None}),
    "truncated_normal": ("TruncatedNormal", {"mean": 0.0, "stddev": 0.05,
                                             "seed": None}),
    "variance_scaling": ("VarianceScaling", {
        "scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal",
        "seed": None}),
    "glorot_uniform": ("GlorotUniform", {"seed": None}),
    "glorot_normal": ("GlorotNormal", {"seed": None}),
    "he_uniform": ("HeUniform", {"seed": None}),
    "he_normal": ("HeNormal", {"seed": None}),
    "lecun_uniform": ("LecunUniform", {"seed": None}),
    "lecun_normal": ("LecunNormal", {"seed": None}),
}

# Keras' shortcuts for the variance-scaling family: (scale, mode, distribution).
_VARIANCE_SCALING = {
    "GlorotUniform": (1.0, "fan_avg", "uniform"),
    "GlorotNormal": (1.0, "fan_avg", "truncated_normal"),
    "HeUniform": (2.0, "fan_in", "uniform"),
    "HeNormal": (2.0, "fan_in", "truncated_normal"),
    "LecunUniform": (1.0, "fan_in", "uniform"),
    "LecunNormal": (1.0, "fan_in", "truncated_normal"),
}


class Initializer(keras_names.KerasObject):
  """A Keras initializer by name, evaluated with ``jax.nn.initializers``."""

  keras_module = "keras.initializers"

  def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    cfg = self.config
    name = self.class_name
    if name == "Zeros":
      return jnp.zeros(shape, dtype)
    if name == "Ones":
      return jnp.ones(shape, dtype)
    if name == "Constant":
      return jnp.full(shape, cfg["value"], dtype)
    key = _seeded(key, cfg.get("seed"))
    if name == "RandomNormal":
      return (jax.nn.initializers.normal(cfg["stddev"])(key, shape, dtype)
              + jnp.asarray(cfg["mean"], dtype))
    if name == "TruncatedNormal":
      init = jax.nn.initializers.truncated_normal(cfg["stddev"])
      return init(key, shape, dtype) + jnp.asarray(cfg["mean"], dtype)
    if name == "RandomUniform":
      lo, hi = cfg["minval"], cfg["maxval"]
      return jax.random.uniform(key, shape, dtype, lo, hi)
    scale, mode, distribution = _VARIANCE_SCALING.get(
        name, (cfg.get("scale"), cfg.get("mode"), cfg.get("distribution")))
    # Keras counts fans of a 1-D variable as (n, n); jax's default axes
    # (-2, -1) need two dimensions, so 1-D shapes use the last axis for both.
    in_axis = -2 if len(shape) >= 2 else -1
    init = jax.nn.initializers.variance_scaling(
        scale, mode, distribution, in_axis=in_axis, out_axis=-1)
    if not shape:
      return init(key, (1,), dtype)[0]
    return init(key, shape, dtype)


def is_constant(initializer) -> bool:
  """Whether ``initializer`` draws nothing (zeros, ones, a constant)."""
  return (isinstance(initializer, Initializer)
          and initializer.class_name in ("Zeros", "Ones", "Constant"))


def _seeded(key: jax.Array | None, seed: int | None) -> jax.Array:
  if seed is not None:
    return jax.random.PRNGKey(seed)
  if key is None:
    raise ValueError(
        "A random initializer needs a PRNG key: pass `key=` to jaxbn.init "
        "(the Linen layer passes its 'params' RNG), or give the initializer a "
        "seed.")
  return key


def _build(class_name: str, config: dict) -> Initializer:
  return Initializer(class_name, keras_names.frozen_items(config))


def get(value: Any, argument: str):
  """Resolves a Keras name, serialized dict or callable to an initializer."""
  return keras_names.resolve(value, argument=argument, registry=REGISTRY,
                             factory=_build, kind="initializer",
                             allow_none=False)


__all__ = ["Initializer", "get", "is_constant", "REGISTRY"]
