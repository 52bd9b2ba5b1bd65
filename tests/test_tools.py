"""Precise BN, folding into Dense/Conv, and checkpoint round trips."""
import dataclasses

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxbn


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, training=False):
    x = jaxbn.BatchNormalization(momentum=0.99, name="bn_in")(x, training)
    x = nn.Dense(6)(x)
    x = jaxbn.BatchNormalization(momentum=0.99, renorm=True, name="bn_mid")(
        x, training)
    return nn.Dense(3)(nn.relu(x))


def _batches(n=5, rows=16, seed=0):
  rng = np.random.RandomState(seed)
  return [(rng.randn(rows, 4) * (1 + i) + i).astype(np.float32)
          for i in range(n)]


@pytest.mark.parametrize("method", ["all_samples", "mean_of_batches"])
def test_precise_statistics_are_exact(method):
  model = Net()
  batches = _batches()
  variables = model.init(jax.random.PRNGKey(0), batches[0])
  out = jaxbn.precise_statistics(model, variables, batches, method=method,
                                 progress=False, training=True)
  data = np.concatenate(batches).astype(np.float64)
  got = out["batch_stats"]["bn_in"]
  if method == "all_samples":
    np.testing.assert_allclose(got["moving_mean"], data.mean(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(got["moving_variance"], data.var(0),
                               rtol=1e-5)
  else:
    means = np.mean([b.mean(0) for b in batches], 0)
    variances = np.mean([b.astype(np.float64).var(0) for b in batches], 0)
    np.testing.assert_allclose(got["moving_mean"], means, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(got["moving_variance"], variances, rtol=1e-5)
  # the second layer's statistics are those of its (training-mode) inputs
  mid = out["batch_stats"]["bn_mid"]
  np.testing.assert_allclose(mid["moving_stddev"] ** 2 - 1e-3,
                             mid["moving_variance"], rtol=1e-4)
  # weights untouched, the original variables unchanged
  assert out["params"] is variables["params"]
  np.testing.assert_array_equal(variables["batch_stats"]["bn_in"][
      "moving_mean"], 0.0)


def test_precise_statistics_rejects_bad_method():
  model = Net()
  variables = model.init(jax.random.PRNGKey(0), _batches(1)[0])
  with pytest.raises(ValueError, match="method"):
    jaxbn.precise_statistics(model, variables, _batches(1), method="ema")


class FlaxNet(nn.Module):
  """A zoo model written with flax's batch norm (and one of jaxbn's)."""

  @nn.compact
  def __call__(self, x, training=False):
    x = nn.BatchNorm(use_running_average=not training, momentum=0.9,
                     name="flax_in")(x)
    x = nn.Dense(6)(x)
    x = jaxbn.BatchNormalization(name="jaxbn_mid")(x, training)
    return nn.Dense(3)(nn.relu(x))


def _float64_population(batches):
  data = np.concatenate(batches).astype(np.float64)
  return data.mean(0), data.var(0)


def _assert_population(mean, var, batches, bessel=False):
  ref_mean, ref_var = _float64_population(batches)
  n = sum(len(b) for b in batches)
  if bessel:
    ref_var = ref_var * n / (n - 1)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)


def test_precise_statistics_of_a_linen_model_with_flax_batch_norms():
  model = FlaxNet()
  batches = _batches(seed=3)
  variables = model.init(jax.random.PRNGKey(0), batches[0])
  out = jaxbn.precise_statistics(model, variables, batches, progress=False)
  got = out["batch_stats"]["flax_in"]
  _assert_population(got["mean"], got["var"], batches)  # flax: biased
  # the jaxbn layer's inputs: the Dense outputs of every batch (float64)
  dense = variables["params"]["Dense_0"]
  flax_bn = nn.BatchNorm(use_running_average=True, momentum=0.9)
  inner = [np.asarray(flax_bn.apply(
      {"params": variables["params"]["flax_in"],
       "batch_stats": variables["batch_stats"]["flax_in"]}, b),
      np.float64) @ np.asarray(dense["kernel"], np.float64) +
      np.asarray(dense["bias"], np.float64) for b in batches]
  mid = out["batch_stats"]["jaxbn_mid"]
  _assert_population(mid["moving_mean"], mid["moving_variance"], inner)
  # the model still runs with the new statistics
  model.apply(out, batches[0])


def test_precise_statistics_of_an_nnx_model_in_place():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.flax_bn = nnx.BatchNorm(4, rngs=rngs)
      self.dense = nnx.Linear(4, 5, rngs=rngs)
      self.jaxbn_bn = jaxbn.nnx.BatchNormalization(
          5, rngs=rngs, moving_variance_estimator="unbiased")

    def __call__(self, x):
      return self.jaxbn_bn(self.dense(self.flax_bn(x)))

  model = Model(nnx.Rngs(0))
  model.eval()
  batches = _batches(seed=4)
  before = nnx.state(model, nnx.Param)
  returned = jaxbn.precise_statistics(model, batches=batches,
                                      method="all_samples", progress=False)
  assert returned is model
  _assert_population(model.flax_bn.mean[...], model.flax_bn.var[...], batches)
  # each layer's statistics are those of its inputs in the call as made (eval
  # mode: flax's layer normalized with its statistics from before, mean 0,
  # variance 1)
  w = np.asarray(model.dense.kernel[...], np.float64)
  b = np.asarray(model.dense.bias[...], np.float64)
  inner = [(bt - 0.0) / np.sqrt(1 + 1e-5) @ w + b for bt in
           (x.astype(np.float64) for x in batches)]
  _assert_population(model.jaxbn_bn.moving_mean[...],
                     model.jaxbn_bn.moving_variance[...], inner, bessel=True)
  after = nnx.state(model, nnx.Param)
  for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(u, v)


def test_precise_statistics_of_the_functional_api_with_masks_and_shards():
  # the layer's inputs sharded over 8 devices, with a mask: the statistics
  # of the valid rows of all batches, pooled
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  config = jaxbn.BatchNormConfig(renorm=True)
  _, state = jaxbn.init(config, (16, 4))
  mesh = Mesh(jax.devices(), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  batches, valid = [], []
  for i, x in enumerate(_batches(seed=5)):
    mask = np.arange(16) % (i + 2) != 0
    batches.append((jax.device_put(x, sharding),
                    jax.device_put(mask, sharding)))
    valid.append(x[mask])
  new_state = jaxbn.precise_statistics(config, state, batches,
                                       progress=False)
  _assert_population(new_state["moving_mean"], new_state["moving_variance"],
                     valid)
  np.testing.assert_allclose(new_state["moving_stddev"] ** 2 - 1e-3,
                             new_state["moving_variance"], rtol=1e-4)
  np.testing.assert_array_equal(new_state["renorm_mean"],
                                state["renorm_mean"])


def test_precise_statistics_names_what_it_needs():
  model = Net()
  variables = model.init(jax.random.PRNGKey(0), _batches(1)[0])
  with pytest.raises(TypeError, match="variables"):
    jaxbn.precise_statistics(model, batches=_batches(1))
  with pytest.raises(TypeError, match="batches"):
    jaxbn.precise_statistics(model, variables)
  with pytest.raises(TypeError, match="BatchNormConfig"):
    jaxbn.precise_statistics(object(), variables, _batches(1))
  with pytest.raises(ValueError, match="at least one batch"):
    jaxbn.precise_statistics(model, variables, [])


def _trained_bn(channels, seed=0):
  rng = np.random.RandomState(seed)
  params = {"gamma": jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32),
            "beta": jnp.asarray(rng.uniform(-1, 1, channels), jnp.float32)}
  state = {"moving_mean": jnp.asarray(rng.randn(channels), jnp.float32),
           "moving_variance": jnp.asarray(rng.uniform(0.5, 2, channels),
                                          jnp.float32)}
  return params, state


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_into_dense(use_bias):
  dense = nn.Dense(5, use_bias=use_bias)
  x = jnp.asarray(np.random.RandomState(1).randn(8, 3), jnp.float32)
  dv = dense.init(jax.random.PRNGKey(0), x)
  config = jaxbn.BatchNormConfig()
  params, state = _trained_bn(5)
  expected, _ = jaxbn.apply(config, params, state, dense.apply(dv, x),
                            training=False)
  kernel, bias = jaxbn.fold_into_kernel(dv["params"]["kernel"],
                                        dv["params"].get("bias"), config,
                                        params, state)
  folded = nn.Dense(5).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)


def test_fold_into_nhwc_conv_and_a_linen_layer_in_a_model():
  conv = nn.Conv(6, (3, 3))
  x = jnp.asarray(np.random.RandomState(2).randn(2, 7, 7, 4), jnp.float32)
  cv = conv.init(jax.random.PRNGKey(0), x)
  layer = jaxbn.BatchNormalization()
  params, state = _trained_bn(6, 3)
  bn_vars = {"params": params, "batch_stats": state}
  expected = layer.apply(bn_vars, conv.apply(cv, x))
  kernel, bias = jaxbn.fold_into_kernel(cv["params"]["kernel"],
                                        cv["params"]["bias"], layer, bn_vars,
                                        None)
  folded = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-4)


def test_fold_into_nchw_conv_with_oihw_kernel():
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(2, 4, 7, 7), jnp.float32)
  kernel = jnp.asarray(rng.randn(6, 4, 3, 3), jnp.float32)  # OIHW
  bias = jnp.asarray(rng.randn(6), jnp.float32)

  def conv(kernel, bias):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NCHW", "OIHW",
                                                        "NCHW"))
    return y + bias[None, :, None, None]

  config = jaxbn.BatchNormConfig(axis=1)
  params, state = _trained_bn(6, 5)
  expected, _ = jaxbn.apply(config, params, state, conv(kernel, bias),
                            training=False)
  k2, b2 = jaxbn.fold_into_kernel(kernel, bias, config, params, state,
                                  kernel_out_axis=0)
  np.testing.assert_allclose(conv(k2, b2), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="output channels"):
    jaxbn.fold_into_kernel(kernel, bias, config, params, state)


def _variables():
  model = Net()
  variables = model.init(jax.random.PRNGKey(0), _batches(1)[0])
  _, updates = model.apply(variables, _batches(1)[0], training=True,
                           mutable=["batch_stats"])
  return {**variables, **updates}


def test_orbax_round_trip_is_bit_exact(tmp_path):
  variables = _variables()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", variables)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt", variables)
  for a, b in zip(jax.tree_util.tree_leaves(variables),
                  jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def test_flax_serialization_round_trip_is_bit_exact():
  variables = _variables()
  restored = flax.serialization.from_bytes(
      variables, flax.serialization.to_bytes(variables))
  for a, b in zip(jax.tree_util.tree_leaves(variables),
                  jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_fold_refuses_a_fused_relu_and_folds_its_affine_part():
  dense = nn.Dense(5)
  x = jnp.asarray(np.random.RandomState(3).randn(8, 3), jnp.float32)
  dv = dense.init(jax.random.PRNGKey(0), x)
  config = jaxbn.BatchNormConfig(activation="relu")
  params, state = _trained_bn(5)
  with pytest.raises(ValueError, match="activation='relu'.*activation=None"):
    jaxbn.fold_into_kernel(dv["params"]["kernel"], dv["params"]["bias"],
                           config, params, state)
  kernel, bias = jaxbn.fold_into_kernel(
      dv["params"]["kernel"], dv["params"]["bias"],
      dataclasses.replace(config, activation=None), params, state)
  folded = nn.Dense(5).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  expected, _ = jaxbn.apply(config, params, state, dense.apply(dv, x),
                            training=False)
  np.testing.assert_allclose(jax.nn.relu(folded), expected, rtol=1e-5,
                             atol=1e-5)
