"""Weight import/export against the real tf_keras, Keras 3, PyTorch and Flax."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import keras_oracle


def _data(shape, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(*shape) * 2 + 0.5).astype(np.float32)


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (8, 5)),
    ({"axis": 1, "momentum": 0.5}, (8, 3, 4, 4)),
    ({"axis": [1, 2], "momentum": 0.5}, (8, 3, 4)),
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0}, "momentum": 0.5},
     (16, 5)),
    ({"virtual_batch_size": 4, "momentum": 0.5}, (16, 3, 5)),
    ({"virtual_batch_size": 2, "axis": [1, 2], "momentum": 0.5}, (8, 3, 5)),
])
def test_from_keras_reproduces_a_trained_tf_keras_layer(kwargs, shape):
  k = keras_oracle.keras()
  layer = k.layers.BatchNormalization(**kwargs)
  for step in range(3):  # move the statistics away from their init
    layer(_data(shape, step), training=True)
  module, variables = jaxbn.from_keras(layer)
  x = _data(shape, 9)
  np.testing.assert_allclose(module.apply(variables, x),
                             layer(x, training=False).numpy(), rtol=1e-5,
                             atol=1e-5)
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  y_keras = layer(x, training=True).numpy()
  np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)
  for variable in layer.non_trainable_weights:
    name = variable.name.split("/")[-1].split(":")[0]
    np.testing.assert_allclose(
        np.ravel(updates["batch_stats"][name]), np.ravel(variable.numpy()),
        rtol=1e-5, atol=1e-6, err_msg=name)


def test_keras_model_variables_and_to_keras():
  k = keras_oracle.keras()
  model = k.Sequential([k.Input((6,)), k.layers.Dense(4, name="d"),
                        k.layers.BatchNormalization(name="bn1"),
                        k.layers.BatchNormalization(renorm=True, name="bn2")])
  model(_data((8, 6)), training=True)
  tree = jaxbn.keras_model_variables(model)
  assert set(tree["params"]) == {"bn1", "bn2"}
  assert "renorm_stddev" in tree["batch_stats"]["bn2"]
  module, variables = jaxbn.from_keras(model.get_layer("bn1"))
  layer = jaxbn.to_keras(module, variables, (8, 4))
  x = _data((8, 4), 3)
  np.testing.assert_allclose(layer(x, training=False).numpy(),
                             module.apply(variables, x), rtol=1e-6)


def test_from_keras_3_layer():
  import keras  # Keras 3
  layer = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-4)
  x0 = _data((8, 5))
  layer(x0, training=True)
  module, variables = jaxbn.from_keras(layer)
  x = _data((8, 5), 2)
  np.testing.assert_allclose(module.apply(variables, x),
                             np.asarray(layer(x, training=False)), rtol=1e-5,
                             atol=1e-5)
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(y, np.asarray(layer(x, training=True)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["moving_variance"],
                             np.asarray(layer.moving_variance), rtol=1e-5)


def test_from_keras_rejects_non_bn_and_adjustment():
  k = keras_oracle.keras()
  with pytest.raises(TypeError, match="BatchNormalization"):
    jaxbn.from_keras(k.layers.Dense(3))
  layer = k.layers.BatchNormalization(adjustment=lambda s: (1.0, 0.0))
  layer.build((4, 3))
  with pytest.raises(ValueError, match="adjustment"):
    jaxbn.from_keras(layer)


@pytest.mark.parametrize("dims,shape", [(1, (16, 5)), (1, (8, 5, 7)),
                                        (2, (8, 5, 4, 4)),
                                        (3, (4, 5, 3, 3, 3))])
def test_from_torch_reproduces_train_and_eval(dims, shape):
  import torch
  cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
         3: torch.nn.BatchNorm3d}[dims]
  bn = cls(5, momentum=0.3)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
    for step in range(2):
      bn.train()(torch.from_numpy(_data(shape, step)))
  module, variables = jaxbn.from_torch(bn)
  assert module.momentum == pytest.approx(0.7)
  x = _data(shape, 5)
  with torch.no_grad():
    expected_eval = bn.eval()(torch.from_numpy(x)).numpy()
    expected_train = bn.train()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(module.apply(variables, x), expected_eval,
                             rtol=1e-5, atol=1e-5)
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(y, expected_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["moving_variance"],
                             bn.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["moving_mean"],
                             bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  back = jaxbn.to_torch(module, {"params": variables["params"],
                                 "batch_stats": updates["batch_stats"]}, dims)
  np.testing.assert_allclose(back.running_var.numpy(), bn.running_var.numpy(),
                             rtol=1e-6)


def test_from_torch_rejects_what_keras_cannot_express():
  import torch
  with pytest.raises(ValueError, match="momentum=None"):
    jaxbn.from_torch(torch.nn.BatchNorm2d(3, momentum=None))
  with pytest.raises(ValueError, match="track_running_stats"):
    jaxbn.from_torch(torch.nn.BatchNorm2d(3, track_running_stats=False))


@pytest.mark.parametrize("axis,shape", [(-1, (16, 5)), (1, (8, 5, 3, 3)),
                                        ((1, 2), (8, 3, 4))])
def test_from_flax_matches_flax_batchnorm(axis, shape):
  bn = nn.BatchNorm(axis=axis, momentum=0.8, epsilon=1e-5,
                    use_fast_variance=False)
  x0 = jnp.asarray(_data(shape))
  variables = bn.init(jax.random.PRNGKey(0), x0, use_running_average=False)
  _, updates = bn.apply(variables, x0, use_running_average=False,
                        mutable=["batch_stats"])
  variables = {**variables, **updates}
  module, ours = jaxbn.from_flax(bn, variables, input_rank=len(shape))
  x = jnp.asarray(_data(shape, 4))
  np.testing.assert_allclose(module.apply(ours, x), bn.apply(
      variables, x, use_running_average=True), rtol=1e-5, atol=1e-5)
  y, upd = module.apply(ours, x, training=True, mutable=["batch_stats"])
  y_ref, upd_ref = bn.apply(variables, x, use_running_average=False,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.ravel(upd["batch_stats"]["moving_variance"]),
                             np.ravel(upd_ref["batch_stats"]["var"]),
                             rtol=1e-5)
