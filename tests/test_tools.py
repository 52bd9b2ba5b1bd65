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
