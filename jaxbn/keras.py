"""jaxbn for Keras 3 (JAX backend): ``BatchNormalization`` with every TF 2.4
argument, those Keras 3 dropped included.

``jaxbn.keras.BatchNormalization`` is a ``keras.layers.Layer`` whose call
runs ``jaxbn.apply``: ``virtual_batch_size``, ``adjustment``, ``fused``, axis
lists and Batch Renormalization come back, with tf_keras' numbers (its
moving variance is Bessel-corrected where TF's fused kernel would run, as
``moving_variance_estimator='keras'`` says). It trains in ``model.fit``,
serves in ``model.predict``, saves and loads in ``.keras`` files (registered
as ``jaxbn>BatchNormalization``), takes Keras' masks, and with
``synchronized=True`` under ``keras.distribution.DataParallel`` its
statistics are those of the global batch (on the JAX backend the step is a
sharded ``jit``, whose reductions are global: Keras 3's own layer computes
global statistics there too, whatever ``synchronized`` says).

Variables keep Keras' names (``gamma``, ``beta``, ``moving_mean``,
``moving_variance``, renorm's ``moving_stddev``, ``renorm_mean``,
``renorm_stddev``); initializers, regularizers and constraints are Keras 3's
own (``keras.initializers.get`` of the same names). Other Keras backends
raise.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxbn import core, optional
from jaxbn.config import BatchNormConfig

keras = optional.require("keras")

# Keras' arguments that Keras builds objects of (the config keeps defaults)
_KERAS_OBJECTS = {
    "beta_initializer": keras.initializers, "gamma_initializer":
    keras.initializers, "moving_mean_initializer": keras.initializers,
    "moving_variance_initializer": keras.initializers,
    "beta_regularizer": keras.regularizers, "gamma_regularizer":
    keras.regularizers, "beta_constraint": keras.constraints,
    "gamma_constraint": keras.constraints}
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(BatchNormConfig)
                       if f.name not in _KERAS_OBJECTS and f.name != "trainable")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BatchNormConfig)}


def _require_jax_backend():
  backend = keras.backend.backend()
  if backend != "jax":
    raise RuntimeError(
        f"jaxbn.keras.BatchNormalization runs on Keras' JAX backend; this "
        f"process uses {backend!r}. Set KERAS_BACKEND=jax before importing "
        "keras (or use tf_keras' own BatchNormalization on TensorFlow).")


@keras.saving.register_keras_serializable(package="jaxbn")
class BatchNormalization(keras.layers.Layer):
  """Keras' ``BatchNormalization`` (TF 2.4 arguments) on Keras 3's JAX
  backend; see the module docstring. ``**kwargs``: Keras' layer arguments
  (``name``, ``dtype``, ``trainable``) and jaxbn's own config arguments
  (``moving_variance_estimator``, ``activation``, ...)."""

  def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True,
               scale=True, beta_initializer="zeros", gamma_initializer="ones",
               moving_mean_initializer="zeros",
               moving_variance_initializer="ones", beta_regularizer=None,
               gamma_regularizer=None, beta_constraint=None,
               gamma_constraint=None, synchronized=False, **kwargs):
    _require_jax_backend()
    arithmetic = {k: kwargs.pop(k) for k in list(kwargs)
                  if k in _CONFIG_FIELDS}
    super().__init__(**kwargs)
    self.config = BatchNormConfig(axis=axis, momentum=momentum,
                                  epsilon=epsilon, center=center, scale=scale,
                                  **arithmetic)
    self.synchronized = bool(synchronized)
    self.keras_objects = {
        name: module.get(value) for name, value, module in (
            (n, v, _KERAS_OBJECTS[n]) for n, v in (
                ("beta_initializer", beta_initializer),
                ("gamma_initializer", gamma_initializer),
                ("moving_mean_initializer", moving_mean_initializer),
                ("moving_variance_initializer", moving_variance_initializer),
                ("beta_regularizer", beta_regularizer),
                ("gamma_regularizer", gamma_regularizer),
                ("beta_constraint", beta_constraint),
                ("gamma_constraint", gamma_constraint)))}
    self.supports_masking = True
    self.statistics = {}
    self.seeds = (keras.random.SeedGenerator(0)
                  if self.config.adjustment is not None else None)

  def build(self, input_shape):
    config = self.config
    shape = config.resolve(tuple(input_shape)).param_shape
    objects = self.keras_objects
    if config.scale:
      self.gamma = self.add_weight(
          shape=shape, name="gamma", initializer=objects["gamma_initializer"],
          regularizer=objects["gamma_regularizer"],
          constraint=objects["gamma_constraint"], trainable=True)
    if config.center:
      self.beta = self.add_weight(
          shape=shape, name="beta", initializer=objects["beta_initializer"],
          regularizer=objects["beta_regularizer"],
          constraint=objects["beta_constraint"], trainable=True)
    initial = core.init_state(config, shape)
    for name, value in initial.items():
      if name in ("moving_mean", "moving_variance"):
        initializer = objects[name + "_initializer"]
      else:  # renorm's, accumulation's: jaxbn's initial values
        initializer = lambda shape, dtype, value=value: value
      self.statistics[name] = self.add_weight(
          shape=value.shape, name=name, dtype=str(value.dtype),
          initializer=initializer, trainable=False, autocast=False)
    if config.renorm:  # renorm's averages start where Keras' moving ones do
      stddev = jnp.sqrt(self.statistics["moving_variance"].value)
      for name, value in (("moving_stddev", stddev), ("renorm_stddev", stddev),
                          ("renorm_mean",
                           self.statistics["moving_mean"].value)):
        self.statistics[name].assign(jnp.copy(value))  # own buffers

  def call(self, inputs, training=None, mask=None):
    training = bool(training) and self.trainable
    params = {}
    if self.config.scale:
      params["gamma"] = self.gamma.value
    if self.config.center:
      params["beta"] = self.beta.value
    state = {n: v.value for n, v in self.statistics.items()}
    key = self.seeds.next() if training and self.seeds else None
    y, new_state = core.apply(self.config, params, state, inputs,
                              training=training, mask=mask, key=key)
    if training:
      for name, variable in self.statistics.items():
        variable.assign(new_state[name])
    return y

  def compute_output_shape(self, input_shape):
    return input_shape

  def compute_mask(self, inputs, mask=None):
    return mask

  def get_config(self):
    base = super().get_config()
    config = {f: getattr(self.config, f) for f in _CONFIG_FIELDS
              if getattr(self.config, f) != _DEFAULTS[f]
              or f in ("axis", "momentum", "epsilon", "center", "scale")}
    if self.config.renorm_clipping is not None:
      config["renorm_clipping"] = self.config.renorm_clipping.as_dict()
    if isinstance(config["axis"], tuple):
      config["axis"] = list(config["axis"])
    if self.config.adjustment is not None:
      raise ValueError("A layer with `adjustment` (a Python callable) cannot "
                       "be serialized; rebuild it in code after loading.")
    config.update({name: keras.saving.serialize_keras_object(value)
                   for name, value in self.keras_objects.items()})
    config["synchronized"] = self.synchronized
    return {**base, **config}


__all__ = ["BatchNormalization"]
