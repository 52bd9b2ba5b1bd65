"""Weight import/export against the real tf_keras, Keras 3, PyTorch and Flax."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import keras_oracle

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True


def _data(shape, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(*shape) * 2 + 0.5).astype(np.float32)


def _short(variable):
  name = getattr(variable, "path", None) or variable.name
  return name.split("/")[-1].split(":")[0]


def _assert_port_matches(layer, shape, trained=True, **port_kwargs):
  """Ports ``layer`` (after 3 training steps when ``trained``) and checks
  inference, a training step and every updated state variable against it."""
  if trained:
    for step in range(3):  # move the statistics away from their init
      layer(_data(shape, step), training=True)
  module, variables = jaxbn.from_keras(layer, **port_kwargs)
  x = _data(shape, 9)
  if trained:
    np.testing.assert_allclose(module.apply(variables, x),
                               np.asarray(layer(x, training=False)),
                               rtol=1e-5, atol=1e-5)
  else:
    variables = module.init(jax.random.PRNGKey(0), x)
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  y_keras = np.asarray(layer(x, training=True))
  np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)
  for variable in layer.non_trainable_weights:
    name = _short(variable)
    np.testing.assert_allclose(
        np.ravel(updates["batch_stats"][name]), np.ravel(np.asarray(variable)),
        rtol=1e-5, atol=1e-6, err_msg=name)
  return module


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (8, 5)),
    ({"axis": 1, "momentum": 0.5}, (8, 3, 4, 4)),
    ({"axis": [1, 2], "momentum": 0.5}, (8, 3, 4)),
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0}, "momentum": 0.5},
     (16, 5)),
    ({"virtual_batch_size": 4, "momentum": 0.5}, (16, 3, 5)),
    ({"virtual_batch_size": 2, "axis": [1, 2], "momentum": 0.5}, (8, 3, 5)),
    # Keras' fused flag as built: Bessel-corrected or not
    ({"momentum": 0.5}, (4, 3, 3, 4)),
    ({"momentum": 0.5, "fused": False}, (4, 3, 3, 4)),
    ({"momentum": 0.5}, (4, 3, 3, 2, 4)),
    ({"momentum": 0.5, "fused": False, "axis": 1}, (4, 4, 3, 2, 3)),
    # ghost layers, whose built axes Keras shifts by one
    ({"virtual_batch_size": 2, "momentum": 0.5}, (4, 3, 3, 5)),
    ({"virtual_batch_size": 2, "axis": 1, "momentum": 0.5}, (4, 3, 3, 3)),
    ({"virtual_batch_size": 2, "axis": 1, "momentum": 0.5}, (4, 6)),
])
def test_from_keras_reproduces_a_trained_tf_keras_layer(kwargs, shape):
  k = keras_oracle.keras()
  _assert_port_matches(k.layers.BatchNormalization(**kwargs), shape)


@pytest.mark.parametrize("kwargs,shape", [
    ({"momentum": 0.5, "fused": False}, (4, 3, 3, 4)),
    ({"virtual_batch_size": 2, "axis": [2, 3], "momentum": 0.5},
     (4, 5, 3, 3)),
])
def test_from_keras_of_an_unbuilt_layer(kwargs, shape):
  k = keras_oracle.keras()
  _assert_port_matches(k.layers.BatchNormalization(**kwargs), shape,
                       trained=False)


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 4), (4, 3, 2, 2, 4)])
def test_from_keras_3_layers_never_bessel_correct(shape):
  import keras  # Keras 3
  layer = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-4)
  module = _assert_port_matches(layer, shape, name="bn")
  assert module.name == "bn"
  assert module.moving_variance_estimator == "biased"
  # the config alone says Keras 3 too
  config = jaxbn.BatchNormConfig.from_config(layer.get_config())
  assert config.moving_variance_estimator == "biased"


@pytest.mark.parametrize("kwargs,shape", [
    ({"virtual_batch_size": 2}, (4, 3, 3, 5)),  # axis -1 -> built [4]
    ({"virtual_batch_size": 2, "axis": 1}, (4, 3, 3, 3)),  # NCHW, H == C
    ({"virtual_batch_size": 2, "axis": 1}, (4, 6)),  # dense features
    ({"axis": [1, 2]}, (4, 3, 3, 5)),
    ({}, (4, 3, 3, 5)),
])
def test_from_config_of_built_and_unbuilt_layers(kwargs, shape):
  k = keras_oracle.keras()
  layer = k.layers.BatchNormalization(momentum=0.5, **kwargs)
  unbuilt = layer.get_config()
  x = _data(shape, 1)
  y_keras = layer(x, training=True).numpy()
  built = layer.get_config()
  for config in (unbuilt, built):
    module = jaxbn.BatchNormalization.from_config(config)
    variables = module.init(jax.random.PRNGKey(0), x)
    y, _ = module.apply(variables, x, training=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)


def test_a_ghost_layer_from_keras_round_trips_through_its_config():
  # a built tf_keras ghost layer's module has axis=(3,); its config must not
  # come back as axis 2, which on (N, H, W, C) with W == C normalizes W
  k = keras_oracle.keras()
  layer = k.layers.BatchNormalization(virtual_batch_size=2, momentum=0.5)
  x = _data((4, 3, 5, 5), 2)
  y_keras = layer(x, training=True).numpy()
  module, variables = jaxbn.from_keras(layer)
  again = jaxbn.BatchNormalization.from_config(module.get_config())
  assert again.config.resolve(x.shape).axes == (3,)
  keras_again = k.layers.BatchNormalization.from_config(
      jaxbn.keras_config(module, x.shape))
  np.testing.assert_allclose(keras_again(x, training=True), y_keras,
                             rtol=1e-5, atol=1e-5)
  for m in (module, again):
    y, _ = m.apply(variables, x, training=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)
  for axis in ((2, 3), (1, 3), (-1,), 2):
    config = jaxbn.BatchNormConfig(axis=axis, virtual_batch_size=2)
    assert jaxbn.BatchNormConfig.from_config(
        config.get_config()).resolve(x.shape).axes == config.resolve(
            x.shape).axes


def test_from_config_reads_list_axes_of_ghost_layers_as_built_unless_told():
  unbuilt = {"axis": [2], "virtual_batch_size": 2}
  assert jaxbn.BatchNormConfig.from_config(unbuilt).axis == (1,)
  assert jaxbn.BatchNormConfig.from_config(unbuilt, built=False).axis == (2,)
  # a list with an axis below 2 cannot be a built ghost layer's
  assert jaxbn.BatchNormConfig.from_config(
      {"axis": [1, 3], "virtual_batch_size": 2}).axis == (1, 3)


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


def _keras_step_matches(layer, module, variables, x):
  """One training step of the tf_keras layer equals the module's."""
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(layer(x, training=True)), y,
                             rtol=1e-4, atol=1e-4)
  for name in ("moving_mean", "moving_variance"):
    np.testing.assert_allclose(np.ravel(layer.weights[
        [_short(v) for v in layer.weights].index(name)].numpy()),
        np.ravel(updates["batch_stats"][name]), rtol=1e-5, atol=1e-6,
        err_msg=name)


@pytest.mark.parametrize("dims,shape", [(2, (4, 3, 5, 5)),
                                        (3, (4, 3, 2, 3, 3))])
def test_to_keras_of_a_torch_port_keeps_the_numbers(dims, shape):
  import torch
  cls = {2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims]
  bn = cls(3, momentum=0.3)
  with torch.no_grad():
    bn.train()(torch.from_numpy(_data(shape)))
  module, variables = jaxbn.from_torch(bn)
  layer = jaxbn.to_keras(module, variables, shape)
  x = _data(shape, 2)
  with torch.no_grad():
    expected = bn.train()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(layer(x, training=True).numpy(), expected,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.ravel(layer.moving_variance.numpy()),
                             bn.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 5), (4, 2, 3, 3, 5)])
def test_to_keras_of_a_flax_port_keeps_the_numbers(shape):
  bn = nn.BatchNorm(momentum=0.8, epsilon=1e-3, use_fast_variance=False)
  x0 = jnp.asarray(_data(shape))
  variables = bn.init(jax.random.PRNGKey(0), x0, use_running_average=False)
  module, ours = jaxbn.from_flax(bn, variables, name="bn")
  assert module.name == "bn"
  layer = jaxbn.to_keras(module, ours, shape)
  _keras_step_matches(layer, module, ours, _data(shape, 3))
  y_flax, upd = bn.apply(variables, _data(shape, 3), use_running_average=False,
                         mutable=["batch_stats"])
  np.testing.assert_allclose(np.ravel(layer.moving_variance.numpy()),
                             np.ravel(upd["batch_stats"]["var"]), rtol=1e-5)


def test_keras_config_raises_what_keras_cannot_express():
  module = jaxbn.BatchNormalization(moving_variance_estimator="unbiased")
  with pytest.raises(ValueError, match="moving_variance_estimator='unbiased'"):
    jaxbn.keras_config(module, (4, 3, 5))
  # where Keras fuses anyway nothing needs saying; elsewhere fused says it
  assert "fused" not in jaxbn.keras_config(module, (4, 3, 3, 5))
  assert jaxbn.keras_config(module.clone(fused=False),
                            (4, 3, 3, 5))["fused"] is True
  biased = module.clone(moving_variance_estimator="biased")
  assert jaxbn.keras_config(biased, (4, 3, 3, 5))["fused"] is False
  ghost = jaxbn.BatchNormalization(virtual_batch_size=2,
                                   virtual_batch_layout="contiguous")
  with pytest.raises(ValueError, match="virtual_batch_layout"):
    jaxbn.keras_config(ghost, (4, 5))
  skip = jaxbn.BatchNormalization(skip_nonfinite_updates=True)
  with pytest.raises(ValueError, match="skip_nonfinite_updates"):
    jaxbn.keras_config(skip, (4, 5))
  relu = jaxbn.BatchNormalization(activation="relu")
  with pytest.raises(ValueError, match="activation='relu'.*ReLU"):
    jaxbn.keras_config(relu, (4, 5))
  with pytest.raises(ValueError, match="activation='relu'.*ReLU"):
    jaxbn.to_torch(relu.clone(axis=1, moving_variance_estimator="unbiased"),
                   {}, dims=1)
  k = keras_oracle.keras()
  # every key is one Keras accepts
  plain = jaxbn.BatchNormalization(moving_variance_estimator="biased",
                                   axis=1)
  k.layers.BatchNormalization.from_config(jaxbn.keras_config(plain,
                                                             (4, 3, 2, 2)))


@pytest.mark.parametrize("axis,shape,dims", [(-1, (8, 4, 4, 3), 2),
                                             (1, (8, 3, 4, 4), 2),
                                             (-1, (8, 3), 1)])
def test_to_torch_accepts_any_single_channel_axis(axis, shape, dims):
  import torch
  module = jaxbn.BatchNormalization(axis=axis, momentum=0.7, epsilon=1e-5,
                                    moving_variance_estimator="unbiased")
  x = _data(shape)
  variables = module.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + 0.25, variables)
  bn = jaxbn.to_torch(module, variables, dims)
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  to_torch_layout = lambda a: np.moveaxis(a, axis, 1)
  with torch.no_grad():
    y_torch = bn.train()(torch.from_numpy(to_torch_layout(x))).numpy()
  np.testing.assert_allclose(to_torch_layout(np.asarray(y)), y_torch,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(bn.running_var.numpy(),
                             updates["batch_stats"]["moving_variance"],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="moving_variance_estimator='biased'"):
    jaxbn.to_torch(module.clone(moving_variance_estimator="biased"),
                   variables, dims)


def test_from_torch_keeps_dtype_and_takes_axis_and_name():
  import torch
  bn = torch.nn.BatchNorm2d(3, momentum=0.2).double()
  with torch.no_grad():
    bn.train()(torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1)
  module, variables = jaxbn.from_torch(bn, axis=-1, name="bn1")
  assert module.name == "bn1" and module.axis == -1
  assert all(v.dtype == np.float64 for v in
             jax.tree.leaves(variables))
  x = np.random.RandomState(0).randn(4, 5, 5, 3)
  with torch.no_grad():
    expected = bn.eval()(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
  np.testing.assert_allclose(np.moveaxis(np.asarray(module.apply(
      variables, x.astype(np.float32))), -1, 1), expected, rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(TypeError, match="`axis` must be one int"):
    jaxbn.from_torch(bn, axis=(1, 2))


def test_from_torch_of_a_half_module_keeps_float32_statistics():
  # a .half() module's float16 running averages would stall: moving toward
  # 1010 from 1000 by 0.01 * 10 per step is below float16's half ulp there
  import torch
  bn = torch.nn.BatchNorm1d(2, momentum=0.01).half()
  with torch.no_grad():
    bn.running_mean.fill_(1000.0)
  module, variables = jaxbn.from_torch(bn)
  assert {v.dtype for v in jax.tree.leaves(variables["params"])} == {
      np.dtype(np.float16)}
  assert {v.dtype for v in jax.tree.leaves(variables["batch_stats"])} == {
      np.dtype(np.float32)}
  x = _data((64, 2), 3)
  x = x - x.mean(0) + 1010.0
  expected = np.full(2, 1000.0)
  step = jax.jit(lambda v: module.apply(v, x, training=True,
                                        mutable=["batch_stats"])[1])
  for _ in range(230):
    variables = {**variables, **step(variables)}
    expected = 0.99 * expected + 0.01 * x.astype(np.float64).mean(0)
  np.testing.assert_allclose(variables["batch_stats"]["moving_mean"],
                             expected, rtol=1e-6)
  assert expected[0] > 1009.0


def test_from_torch_ports_sync_batch_norm_across_the_named_axis():
  # SyncBatchNorm normalizes over its whole process group: the same numbers
  # as a BatchNorm over the concatenated batch, here 8 devices of shard_map
  import torch
  from jax.sharding import Mesh, PartitionSpec as P
  sync = torch.nn.SyncBatchNorm(3, momentum=0.2)
  with pytest.raises(ValueError, match="process group.*axis_name="):
    jaxbn.from_torch(sync)
  with pytest.raises(ValueError, match="axis_name='data' is for a Sync"):
    jaxbn.from_torch(torch.nn.BatchNorm2d(3), axis_name="data")
  with torch.no_grad():
    sync.weight.uniform_(0.5, 1.5)
    sync.bias.uniform_(-0.5, 0.5)
  module, variables = jaxbn.from_torch(sync, axis_name="data")
  whole = torch.nn.BatchNorm2d(3, momentum=0.2)
  whole.load_state_dict(sync.state_dict())
  x = _data((16, 3, 4, 4), 5)
  with torch.no_grad():
    expected = whole.train()(torch.from_numpy(x)).numpy()
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  step = jax.jit(jax.shard_map(
      lambda v, x: module.apply(v, x, training=True, mutable=["batch_stats"]),
      mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))
  y, updates = step(variables, x)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["moving_variance"],
                             whole.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["moving_mean"],
                             whole.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  assert jaxbn.torch_model_variables(torch.nn.Sequential(sync))[
      "batch_stats"]["0"]["moving_mean"].dtype == np.float32


def test_torch_model_variables_feed_a_flax_mirror():
  import torch

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
      self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
      return torch.relu(self.bn(self.conv(x)))

  torch.manual_seed(0)
  net = torch.nn.Sequential(Block(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 5 * 5, 6),
                            torch.nn.BatchNorm1d(6, affine=False))
  with torch.no_grad():
    for _ in range(3):
      net.train()(torch.randn(8, 3, 5, 5) * 2 + 1)
  tree = jaxbn.torch_model_variables(net, axis=1)
  assert set(tree["batch_stats"]) == {"0", "3"}
  assert set(tree["params"]) == {"0"}  # BatchNorm1d(affine=False): no params
  np.testing.assert_array_equal(tree["batch_stats"]["0"]["bn"]["moving_mean"],
                                net[0].bn.running_mean.numpy())

  class Mirror(nn.Module):  # NCHW like torch: axis 1, torch's names
    @nn.compact
    def __call__(self, x, training=False):
      x = jax.lax.conv_general_dilated(
          x, self.param("conv", nn.initializers.zeros, (4, 3, 3, 3)),
          (1, 1), "SAME")
      x = jax.nn.relu(jaxbn.BatchNormalization(
          axis=1, epsilon=1e-5, momentum=0.9, name="bn",
          moving_variance_estimator="unbiased")(x, training))
      return x

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
      x = Mirror(name="0")(x, training)
      x = x.reshape(x.shape[0], -1)
      x = nn.Dense(6, name="2")(x)
      return jaxbn.BatchNormalization(
          axis=1, epsilon=1e-5, momentum=0.9, center=False, scale=False,
          name="3",
          moving_variance_estimator="unbiased")(x, training)

  x = np.random.RandomState(1).randn(8, 3, 5, 5).astype(np.float32)
  variables = Net().init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(np.asarray, dict(variables["params"]))
  params["0"] = dict(params["0"], **tree["params"]["0"],
                     conv=net[0].conv.weight.detach().numpy())
  params["2"] = {"kernel": net[2].weight.detach().numpy().T,
                 "bias": net[2].bias.detach().numpy()}
  ported = {"params": params, "batch_stats": tree["batch_stats"]}
  with torch.no_grad():
    expected = net.eval()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(Net().apply(ported, x), expected, rtol=1e-4,
                             atol=1e-4)
  # one training step: outputs and every running statistic
  y, updates = Net().apply(ported, x, training=True, mutable=["batch_stats"])
  with torch.no_grad():
    expected = net.train()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  after = jaxbn.torch_model_variables(net)["batch_stats"]
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]),
                  jax.tree.leaves(after)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,shape", [
    ({"momentum": 0.8, "epsilon": 1e-4}, (8, 5)),
    ({"axis": 1, "momentum": 0.5, "center": False}, (4, 3, 4, 4)),
    ({"axis": 2, "momentum": 0.5, "gamma_initializer": "random_normal"},
     (8, 3, 4)),
    ({"momentum": 0.5, "renorm": True,
      "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}},
     (8, 4, 4, 3)),
])
def test_keras_3_round_trip(kwargs, shape):
  # Keras 3 -> jaxbn -> Keras 3 (config and built layer with the weights):
  # the same training step and updates as the original; and a jaxbn module
  # whose moving variance Keras 3 cannot express is refused by name
  import keras  # Keras 3
  layer = keras.layers.BatchNormalization(**kwargs)
  for step in range(2):
    layer(_data(shape, step), training=True)
  module, variables = jaxbn.from_keras(layer)
  config = jaxbn.keras_config(module, shape, target="keras3")
  assert "fused" not in config and "virtual_batch_size" not in config
  again = jaxbn.to_keras(module, variables, shape, target="keras3")
  assert type(again) is keras.layers.BatchNormalization
  x = _data(shape, 7)
  for trained in (layer, again):
    np.testing.assert_allclose(trained(x, training=False),
                               module.apply(variables, x), rtol=1e-5,
                               atol=1e-5)
  y, updates = module.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  for keras_layer in (layer, again):
    np.testing.assert_allclose(keras_layer(x, training=True), y, rtol=1e-4,
                               atol=1e-4)
    for variable in keras_layer.non_trainable_weights:
      name = _short(variable)
      np.testing.assert_allclose(
          np.ravel(updates["batch_stats"][name]),
          np.ravel(np.asarray(variable)), rtol=1e-5, atol=1e-6,
          err_msg=name)
  back, _ = jaxbn.from_keras(again)
  assert back.config == module.config


def test_keras_3_target_refuses_what_keras_3_cannot_express():
  shape = (4, 3, 3, 2)
  for module, match in [
      (jaxbn.BatchNormalization(), "Bessel-corrected.*Keras 3 never"),
      (jaxbn.BatchNormalization(virtual_batch_size=2,
                                moving_variance_estimator="biased"),
       "virtual_batch_size .* no Keras 3"),
      (jaxbn.BatchNormalization(activation="relu",
                                moving_variance_estimator="biased"),
       "no Keras 3 BatchNormalization"),
      (jaxbn.BatchNormalization(axis=(1, 3),
                                moving_variance_estimator="biased"),
       "Keras 3 BatchNormalization takes one channel axis"),
  ]:
    with pytest.raises(ValueError, match=match):
      jaxbn.keras_config(module, shape, target="keras3")
  with pytest.raises(ValueError, match="`target` must be one of"):
    jaxbn.keras_config(jaxbn.BatchNormalization(), shape, target="keras2")
  config = jaxbn.keras_config(
      jaxbn.BatchNormalization(moving_variance_estimator="biased"), shape,
      target="keras3")
  # marked as Keras 3's: read back with its (never corrected) variance
  assert jaxbn.BatchNormConfig.from_config(config) == jaxbn.BatchNormConfig(
      moving_variance_estimator="biased")


def test_from_keras_3_renorm_layer():
  import keras  # Keras 3 has Batch Renormalization too
  layer = keras.layers.BatchNormalization(
      momentum=0.5, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0})
  module = _assert_port_matches(layer, (8, 4, 4, 3))
  assert module.renorm and module.moving_variance_estimator == "biased"


def test_a_missing_converter_dependency_names_its_extra(monkeypatch):
  import sys
  layer = jaxbn.BatchNormalization()
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
  for module in ("tf_keras", "torch"):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'jaxbn\[interop\]'"):
    jaxbn.to_keras(layer, variables, (4, 3))
  with pytest.raises(ImportError, match=r"pip install 'jaxbn\[interop\]'"):
    jaxbn.to_torch(layer, variables, dims=1)
