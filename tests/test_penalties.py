"""Regularizers and constraints against tf_keras."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import penalties
from tests import keras_oracle

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

REGULARIZERS = ["l1", "l2", "l1_l2",
                {"class_name": "L1L2", "config": {"l1": 0.3, "l2": 0.05}},
                {"class_name": "L2", "config": {"l2": 1.5}}]
CONSTRAINTS = ["non_neg", "unit_norm", "max_norm", "min_max_norm",
               {"class_name": "MaxNorm", "config": {"max_value": 0.5,
                                                    "axis": 0}},
               {"class_name": "MinMaxNorm",
                "config": {"min_value": 0.2, "max_value": 0.4, "rate": 0.5,
                           "axis": 0}}]


def _keras_obj(kind, spec):
  k = keras_oracle.keras()
  return getattr(k, kind).get(spec)


@pytest.mark.parametrize("spec", REGULARIZERS)
@pytest.mark.parametrize("shape,axis,vbs", [((8, 5), -1, None),
                                            ((4, 3, 5), [1, 2], None),
                                            ((4, 3, 5), -1, 2)])
def test_regularization_loss_equals_keras_layer_losses(spec, shape, axis,
                                                       vbs):
  k = keras_oracle.keras()
  kwargs = {"axis": axis, "gamma_regularizer": spec, "beta_regularizer": spec,
            "virtual_batch_size": vbs}
  layer = k.layers.BatchNormalization(**kwargs)
  layer.build(shape)
  rng = np.random.RandomState(0)
  layer.gamma.assign(rng.randn(*layer.gamma.shape).astype(np.float32))
  layer.beta.assign(rng.randn(*layer.beta.shape).astype(np.float32))
  expected = float(sum(l.numpy() for l in layer.losses))
  config = jaxbn.BatchNormConfig(**kwargs)
  params, _ = jaxbn.init(config, shape)
  params = {n: jnp.asarray(getattr(layer, n).numpy()).reshape(p.shape)
            for n, p in params.items()}
  got = float(jaxbn.regularization_loss(config, params))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  module = jaxbn.BatchNormalization(**kwargs)
  assert float(jaxbn.regularization_loss(module, {"params": params})) == got


@pytest.mark.parametrize("spec", CONSTRAINTS)
@pytest.mark.parametrize("shape,axis,vbs", [((8, 5), -1, None),
                                            ((4, 3, 5), [1, 2], None),
                                            ((4, 3, 5), -1, 2),
                                            ((4, 3, 5), 1, 2),
                                            ((4, 3, 5), [1, 2], 2)])
def test_constraints_project_like_keras(spec, shape, axis, vbs):
  k = keras_oracle.keras()
  layer = k.layers.BatchNormalization(axis=axis, virtual_batch_size=vbs)
  layer.build(shape)
  rng = np.random.RandomState(1)
  value = rng.randn(*layer.gamma.shape).astype(np.float32) * 2
  expected = _keras_obj("constraints", spec)(value).numpy()
  config = jaxbn.BatchNormConfig(axis=axis, virtual_batch_size=vbs,
                                 gamma_constraint=spec, beta_constraint=spec)
  params, _ = jaxbn.init(config, shape)
  params = {n: jnp.asarray(value).reshape(p.shape) for n, p in params.items()}
  got = jaxbn.apply_constraints(config, params, input_rank=len(shape))
  for name in ("gamma", "beta"):
    np.testing.assert_allclose(np.asarray(got[name]).ravel(),
                               expected.ravel(), rtol=1e-6, atol=1e-7)


def test_virtual_batch_constraints_need_the_input_rank():
  config = jaxbn.BatchNormConfig(virtual_batch_size=2,
                                 gamma_constraint="unit_norm")
  params, _ = jaxbn.init(config, (4, 3, 5))
  with pytest.raises(ValueError, match="input_rank"):
    jaxbn.apply_constraints(config, params)


def test_elementwise_constraints_need_no_input_rank():
  import tf_keras
  config = jaxbn.BatchNormConfig(virtual_batch_size=2,
                                 gamma_constraint="non_neg",
                                 beta_constraint="non_neg")
  params, _ = jaxbn.init(config, (4, 3, 5))
  params = {k: jnp.linspace(-1, 1, 5) for k in params}
  got = jaxbn.apply_constraints(config, params)
  keras_constraint = tf_keras.constraints.NonNeg()
  for name in params:
    np.testing.assert_array_equal(
        got[name], np.asarray(keras_constraint(np.asarray(params[name]))))


def test_plain_callables_are_accepted():
  config = jaxbn.BatchNormConfig(
      gamma_regularizer=lambda w: 3.0 * jnp.sum(w),
      beta_constraint=lambda w: jnp.clip(w, -0.1, 0.1))
  params = {"gamma": jnp.array([1.0, 2.0]), "beta": jnp.array([-1.0, 0.05])}
  assert float(jaxbn.regularization_loss(config, params)) == 9.0
  np.testing.assert_array_equal(
      jaxbn.apply_constraints(config, params)["beta"],
      np.float32([-0.1, 0.05]))


@pytest.mark.parametrize("bad,match", [
    ("l3", "Unknown regularizer name"),
    ({"class_name": "Foo"}, "Unknown regularizer class"),
    ({"config": {}}, "without 'class_name'"),
    ({"class_name": "L2", "config": {"l1": 1.0}}, "does not take"),
    (3, "must be a regularizer name"),
])
def test_bad_regularizers_are_rejected(bad, match):
  with pytest.raises((ValueError, TypeError), match=match):
    jaxbn.BatchNormConfig(gamma_regularizer=bad)


def test_constraint_formulas_are_keras():
  w = jnp.array([[3.0, -4.0]])
  c = penalties.get_constraint({"class_name": "MaxNorm",
                                "config": {"max_value": 2, "axis": 1}}, "c")
  np.testing.assert_allclose(c(w), w * 2 / (5 + 1e-7), rtol=1e-6)
