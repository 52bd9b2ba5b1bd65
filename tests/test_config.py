"""BatchNormConfig: defaults, validation errors, Keras config round trips."""
import dataclasses
import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.linen import CONFIG_FIELDS
from tests import keras_oracle

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

KERAS_ONLY = {"name", "synchronized", "kwargs", "self"}
JAXBN_ONLY = {"moving_variance_estimator", "virtual_batch_layout",
              "accumulation_steps",
              "skip_nonfinite_updates", "activation"}


def test_every_keras_argument_with_keras_defaults():
  k = keras_oracle.keras()
  # The public class forwards most arguments; its base lists them all.
  base = k.layers.BatchNormalization.__mro__[1]
  keras_sig = inspect.signature(base.__init__)
  keras_defaults = {n: p.default for n, p in keras_sig.parameters.items()
                    if n not in KERAS_ONLY}
  fields = {f.name: f.default for f in dataclasses.fields(jaxbn.BatchNormConfig)}
  assert set(fields) - JAXBN_ONLY == set(keras_defaults)
  for name, default in keras_defaults.items():
    assert fields[name] == default, name


def test_linen_layer_has_every_config_field():
  module_fields = {f.name for f in dataclasses.fields(jaxbn.BatchNormalization)}
  assert set(CONFIG_FIELDS) <= module_fields
  assert {"axis_name", "axis_index_groups"} <= module_fields


def test_config_is_hashable_and_equal_by_value():
  a = jaxbn.BatchNormConfig(axis=[1, 2], renorm=True,
                            renorm_clipping={"rmax": 3.0},
                            gamma_regularizer="l2")
  b = jaxbn.BatchNormConfig(axis=(1, 2), renorm=True,
                            renorm_clipping={"rmax": 3.0},
                            gamma_regularizer={"class_name": "L2",
                                               "config": {"l2": 0.01}})
  assert a == b and hash(a) == hash(b)


KERAS_CONFIGS = [
    {},
    {"axis": 1, "momentum": 0.9, "epsilon": 1e-5, "center": False},
    {"axis": [1, 2], "scale": False, "gamma_initializer": "random_normal"},
    {"renorm": True, "renorm_clipping": {"rmax": 3, "dmax": 5},
     "renorm_momentum": 0.9},
    {"virtual_batch_size": 8, "beta_regularizer": "l1",
     "gamma_regularizer": "l1_l2", "beta_constraint": "max_norm",
     "gamma_constraint": "non_neg", "moving_variance_initializer":
         "glorot_uniform"},
    {"trainable": False, "fused": False, "moving_mean_initializer":
         {"class_name": "Constant", "config": {"value": 0.5}}},
]


@pytest.mark.parametrize("kwargs", KERAS_CONFIGS)
def test_keras_config_round_trip(kwargs):
  k = keras_oracle.keras()
  layer = k.layers.BatchNormalization(**kwargs)
  keras_config = layer.get_config()
  config = jaxbn.BatchNormConfig.from_config(keras_config)
  module = jaxbn.BatchNormalization.from_config(keras_config)
  assert module.config == config
  ours = config.get_config()
  for key, value in ours.items():
    if key == "fused":
      continue
    expected = keras_config[key]
    if hasattr(expected, "items"):
      expected = dict(expected)
    if isinstance(value, dict) and "config" in value:
      assert value["class_name"] == expected["class_name"], key
      np.testing.assert_allclose(
          [float(v) for v in value["config"].values() if v is not None],
          [float(v) for v in expected["config"].values() if v is not None],
          rtol=1e-6, err_msg=key)
    else:
      assert value == expected, key
  # and back: Keras builds the same layer from jaxbn's config
  again = k.layers.BatchNormalization.from_config(ours).get_config()
  for key in ours:
    if key != "fused":
      assert str(again[key]) == str(keras_config[key]), key


def test_from_config_ignores_layer_base_keys_and_rejects_synchronized():
  config = jaxbn.BatchNormConfig.from_config(
      {"name": "bn", "dtype": "float32", "axis": [3], "momentum": 0.5})
  assert config.axis == (3,) and config.momentum == 0.5
  with pytest.raises(ValueError, match="axis_name"):
    jaxbn.BatchNormConfig.from_config({"synchronized": True})
  with pytest.raises(ValueError, match="Unknown BatchNormalization config"):
    jaxbn.BatchNormConfig.from_config({"momentun": 0.5})


INVALID = [
    ({"axis": 1.5}, TypeError, "`axis`"),
    ({"axis": True}, TypeError, "`axis`"),
    ({"axis": []}, ValueError, "`axis`"),
    ({"axis": [1, 1]}, ValueError, "duplicates"),
    ({"axis": [1, "a"]}, TypeError, "only ints"),
    ({"momentum": 1.5}, ValueError, "`momentum`.*1 - momentum"),
    ({"momentum": "0.9"}, TypeError, "`momentum`"),
    ({"renorm_momentum": -0.1}, ValueError, "`renorm_momentum`"),
    ({"epsilon": -1e-3}, ValueError, "`epsilon`"),
    ({"epsilon": float("nan")}, ValueError, "`epsilon`"),
    ({"center": 1}, TypeError, "`center`"),
    ({"scale": None}, TypeError, "`scale`"),
    ({"trainable": "yes"}, TypeError, "`trainable`"),
    ({"gamma_initializer": "onez"}, ValueError, "Unknown initializer"),
    ({"beta_initializer": None}, ValueError, "`beta_initializer`"),
    ({"gamma_constraint": "positive"}, ValueError, "Unknown constraint"),
    ({"renorm": True, "renorm_clipping": {"rmax": 3, "foo": 1}}, ValueError,
     "unknown keys.*foo"),
    ({"renorm": True, "renorm_clipping": [3]}, TypeError,
     "`renorm_clipping`"),
    ({"renorm": True, "renorm_clipping": {"rmax": -1}}, ValueError, "rmax"),
    ({"renorm": True, "renorm_clipping": {"rmin": 2, "rmax": 1}}, ValueError,
     "rmin"),
    ({"renorm": True, "renorm_clipping": {"dmax": "big"}}, TypeError,
     "dmax"),
    ({"fused": "yes"}, TypeError, "`fused`"),
    ({"fused": True, "renorm": True}, ValueError, "renorm"),
    ({"fused": True, "axis": [1, 3]}, ValueError, "single channel axis"),
    ({"fused": True, "axis": 2}, ValueError, "axis"),
    ({"fused": True, "virtual_batch_size": 2}, ValueError,
     "virtual_batch_size"),
    ({"fused": True, "adjustment": lambda s, k: (1.0, 0.0)}, ValueError,
     "adjustment"),
    ({"virtual_batch_size": 0}, ValueError, "`virtual_batch_size`"),
    ({"virtual_batch_size": 2.5}, ValueError, "`virtual_batch_size`"),
    ({"virtual_batch_size": 2, "axis": [0, 1]}, ValueError, "batch axis"),
    ({"virtual_batch_size": 2, "adjustment": lambda s, k: (1.0, 0.0)},
     ValueError, "adjustment"),
    ({"adjustment": 3}, TypeError, "`adjustment`"),
    ({"moving_variance_estimator": "bessel"}, ValueError,
     "moving_variance_estimator"),
    ({"virtual_batch_layout": "random"}, ValueError, "virtual_batch_layout"),
    ({"activation": "gelu"}, ValueError, "`activation`.*'gelu'"),
]


@pytest.mark.parametrize("kwargs,error,match", INVALID)
def test_invalid_arguments_raise_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxbn.BatchNormConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"fused": True, "renorm": True}, {"fused": True, "axis": [1, 3]},
    {"fused": True, "virtual_batch_size": 2},
    {"renorm": True, "renorm_clipping": {"rmax": 3, "foo": 1}},
])
def test_keras_rejects_the_same_arguments(kwargs):
  k = keras_oracle.keras()
  with pytest.raises(ValueError):
    k.layers.BatchNormalization(**kwargs)


INVALID_INPUTS = [
    ({}, (5,), ValueError, "rank >= 2"),
    ({"axis": 3}, (4, 5, 6), ValueError, "out of range"),
    ({"axis": [1, -2]}, (4, 5, 6), ValueError, "same axis twice"),
    ({"fused": True}, (4, 5, 6), ValueError, "4-D or 5-D"),
    ({"fused": True, "axis": -4}, (4, 5, 6, 7), ValueError, "axis 1 or 3"),
    ({"virtual_batch_size": 2, "axis": -3}, (4, 5, 6), ValueError,
     "batch axis 0"),
]


@pytest.mark.parametrize("kwargs,shape,error,match", INVALID_INPUTS)
def test_inputs_that_do_not_fit_raise_at_init(kwargs, shape, error, match):
  config = jaxbn.BatchNormConfig(**kwargs)
  with pytest.raises(error, match=match):
    jaxbn.init(config, shape)


def test_inputs_that_do_not_fit_the_variables_raise_at_apply():
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, (4, 5))
  with pytest.raises(ValueError, match="channel count"):
    jaxbn.apply(config, params, state, jnp.ones((4, 6)), training=True)
  with pytest.raises(TypeError, match="complex"):
    jaxbn.apply(config, params, state, jnp.ones((4, 5), jnp.complex64),
                training=True)
  with pytest.raises(ValueError, match="does not align"):
    jaxbn.apply(config, params, state, jnp.ones((4, 5)), training=True,
                mask=jnp.ones((3, 5), bool))
  with pytest.raises(TypeError, match="Python bool"):
    jaxbn.apply(config, params, state, jnp.ones((4, 5)), training="yes")
  with pytest.raises(ValueError, match="no 'gamma'"):
    jaxbn.apply(config, {"beta": params["beta"]}, state, jnp.ones((4, 5)),
                training=True)
  vconfig = jaxbn.BatchNormConfig(virtual_batch_size=3)
  with pytest.raises(ValueError, match="not a multiple"):
    jaxbn.apply(vconfig, params, state, jnp.ones((4, 5)), training=True)
  # inference accepts any batch size (Keras once required a multiple)
  y, _ = jaxbn.apply(vconfig, params, state, jnp.ones((4, 5)), training=False)
  assert y.shape == (4, 5)


def test_keras_silently_drops_fused_for_5d_with_other_axis():
  # Keras accepts fused=True with axis=3 for a 5-D input and runs its
  # non-fused path (biased moving variance); jaxbn does the same.
  keras_oracle.compare({"fused": True, "axis": 3, "momentum": 0.5},
                       (2, 3, 4, 5, 6), steps=2)


def test_jaxbn_arguments_round_trip_through_get_config():
  config = jaxbn.BatchNormConfig(activation="relu",
                                 moving_variance_estimator="biased",
                                 virtual_batch_size=2,
                                 virtual_batch_layout="contiguous",
                                 skip_nonfinite_updates=True)
  assert jaxbn.BatchNormConfig.from_config(config.get_config()) == config
  assert "activation" not in jaxbn.BatchNormConfig().get_config()


def test_an_input_shape_is_resolved_once_per_config():
  # a layer and apply resolve the same shape on every call: kept per
  # (config, shape); a config with an unhashable field resolves each time
  config = jaxbn.BatchNormConfig(axis=[1, 2])
  first = config.resolve((4, 3, 5, 2))
  assert config.resolve([4, 3, 5, 2]) is first
  assert first.param_shape == (1, 3, 5, 1) and first.reduction_axes == (0, 3)

  class Adjustment:
    __hash__ = None

    def __call__(self, shape):
      return jnp.ones(shape[-1:]), jnp.zeros(shape[-1:])

  unhashable = jaxbn.BatchNormConfig(adjustment=Adjustment())
  assert unhashable.resolve((4, 3)) == unhashable.resolve((4, 3))
  assert unhashable.resolve((4, 3)).bessel is False
  with pytest.raises(ValueError, match="out of range"):
    jaxbn.BatchNormConfig(axis=5).resolve((4, 3))
