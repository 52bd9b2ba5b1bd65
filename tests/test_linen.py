"""The Linen layer: variables, modes, and composition under JAX/Flax transforms."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True


def _x(shape=(16, 6), seed=0, mean=1.0, std=2.0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * std + mean


def test_variables_use_keras_names_and_init_updates_nothing():
  layer = jaxbn.BatchNormalization(momentum=0.5)
  x = _x()
  variables = layer.init(jax.random.PRNGKey(0), x, training=True)
  assert set(variables["params"]) == {"gamma", "beta"}
  assert set(variables["batch_stats"]) == {"moving_mean", "moving_variance"}
  np.testing.assert_array_equal(variables["batch_stats"]["moving_mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"],
                                1.0)


def test_linen_equals_functional_core():
  config = jaxbn.BatchNormConfig(momentum=0.7, axis=[1, 2])
  layer = jaxbn.BatchNormalization(momentum=0.7, axis=[1, 2])
  x = _x((8, 3, 5))
  variables = layer.init(jax.random.PRNGKey(0), x)
  y, updates = layer.apply(variables, x, training=True,
                           mutable=["batch_stats"])
  y_ref, state = jaxbn.apply(config, variables["params"],
                             variables["batch_stats"], x, training=True)
  np.testing.assert_array_equal(y, y_ref)
  for name in state:
    np.testing.assert_array_equal(updates["batch_stats"][name], state[name])


def test_training_none_is_inference_and_trainable_false_freezes():
  x = _x()
  layer = jaxbn.BatchNormalization()
  variables = layer.init(jax.random.PRNGKey(0), x)
  y_none = layer.apply(variables, x)
  y_false = layer.apply(variables, x, training=False)
  np.testing.assert_array_equal(y_none, y_false)
  np.testing.assert_allclose(y_none, x / jnp.sqrt(1 + 1e-3), rtol=1e-6)
  frozen = jaxbn.BatchNormalization(trainable=False)
  y, updates = frozen.apply(variables, x, training=True,
                            mutable=["batch_stats"])
  np.testing.assert_array_equal(y, y_none)
  np.testing.assert_array_equal(updates["batch_stats"]["moving_mean"],
                                variables["batch_stats"]["moving_mean"])


def test_training_without_mutable_batch_stats_explains_the_fix():
  layer = jaxbn.BatchNormalization()
  x = _x()
  variables = layer.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
    layer.apply(variables, x, training=True)


def test_adjustment_uses_the_adjustment_rng_stream():
  def adjustment(shape, key):
    return (jax.random.uniform(key, (shape[-1],), minval=0.5, maxval=1.5),
            jnp.zeros((shape[-1],)))
  layer = jaxbn.BatchNormalization(adjustment=adjustment)
  x = _x()
  variables = layer.init(jax.random.PRNGKey(0), x)
  run = lambda k: layer.apply(variables, x, training=True,
                              mutable=["batch_stats"],
                              rngs={"adjustment": k})[0]
  a, b, a2 = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2)), run(
      jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, a2)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  with pytest.raises(ValueError, match=r"no key was given.*rngs=\{'adjustment"):
    layer.apply(variables, x, training=True, mutable=["batch_stats"])


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, training=False):
    x = nn.Dense(8)(x)
    x = jaxbn.BatchNormalization(momentum=0.9)(x, training=training)
    x = nn.relu(x)
    x = nn.Dense(3)(x)
    return jaxbn.BatchNormalization(momentum=0.9, renorm=True)(
        x, training=training)


def _train_step(model):
  def loss_fn(params, batch_stats, x):
    y, updates = model.apply({"params": params, "batch_stats": batch_stats},
                             x, training=True, mutable=["batch_stats"])
    return jnp.sum(y ** 2 * jnp.arange(3.0)), updates["batch_stats"]
  return jax.value_and_grad(loss_fn, has_aux=True)


def test_jit_grad_and_training_loop_in_a_model():
  model = MLP()
  x = _x((32, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  step = jax.jit(_train_step(model))
  (loss, stats), grads = step(variables["params"], variables["batch_stats"], x)
  (loss2, _), grads2 = _train_step(model)(variables["params"],
                                          variables["batch_stats"], x)
  np.testing.assert_allclose(loss, loss2, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads2, rtol=1e-4, atol=1e-5)
  assert not np.allclose(stats["BatchNormalization_0"]["moving_mean"], 0)


def test_remat_gives_the_same_gradients():
  model = MLP()
  remat_model = nn.remat(MLP, static_argnums=(2,))()
  x = _x((32, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  (_, s1), g1 = _train_step(model)(variables["params"],
                                   variables["batch_stats"], x)

  def loss_fn(params, batch_stats, x):
    y, updates = remat_model.apply(
        {"params": params, "batch_stats": batch_stats}, x, True,
        mutable=["batch_stats"])
    return jnp.sum(y ** 2 * jnp.arange(3.0)), updates["batch_stats"]
  (_, s2), g2 = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"], variables["batch_stats"], x)
  # atol 1e-5: Dense biases in front of BN have zero gradient in exact
  # arithmetic, so both runs return rounding noise of ~1e-6 there.
  chex.assert_trees_all_close((g1, s1), (g2, s2), rtol=1e-5, atol=1e-5)


def test_scan_over_layers_carries_batch_stats():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      x = nn.Dense(4)(x)
      return jaxbn.BatchNormalization(momentum=0.5)(x, training=True), None

  Stack = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                  split_rngs={"params": True}, length=3)
  x = _x((8, 4))
  variables = Stack().init(jax.random.PRNGKey(0), x, None)
  assert variables["batch_stats"]["BatchNormalization_0"][
      "moving_mean"].shape == (3, 4)
  (y, _), updates = jax.jit(lambda v, x: Stack().apply(
      v, x, None, mutable=["batch_stats"]))(variables, x)
  assert y.shape == (8, 4)
  means = updates["batch_stats"]["BatchNormalization_0"]["moving_mean"]
  assert not np.allclose(means, 0.0)


def test_vmap_over_independent_models():
  layer = jaxbn.BatchNormalization(momentum=0.5)
  xs = _x((3, 16, 5))
  variables = jax.vmap(lambda x: layer.init(jax.random.PRNGKey(0), x))(xs)
  ys, updates = jax.vmap(lambda v, x: layer.apply(
      v, x, training=True, mutable=["batch_stats"]))(variables, xs)
  for i in range(3):
    v_i = jax.tree_util.tree_map(lambda a: a[i], variables)
    y_i, u_i = layer.apply(v_i, xs[i], training=True,
                           mutable=["batch_stats"])
    np.testing.assert_allclose(ys[i], y_i, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["moving_variance"][i],
                               u_i["batch_stats"]["moving_variance"],
                               rtol=1e-6)


def test_vmap_with_axis_name_gives_whole_batch_statistics():
  x = _x((16, 5))
  config = jaxbn.BatchNormConfig(momentum=0.5)
  params, state = jaxbn.init(config, x.shape)
  y_ref, s_ref = jaxbn.apply(config, params, state, x, training=True)
  y, s = jax.vmap(
      lambda xi: jaxbn.apply(config, params, state, xi[None], training=True,
                             axis_name="batch"),
      axis_name="batch", out_axes=(0, None))(x)
  np.testing.assert_allclose(y[:, 0], y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s["moving_variance"], s_ref["moving_variance"],
                             rtol=1e-5)


def test_eval_shape_and_no_retracing():
  model = MLP()
  x = _x((32, 4))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert shapes["params"]["BatchNormalization_0"]["gamma"].shape == (8,)
  variables = model.init(jax.random.PRNGKey(0), x)
  traces = []

  @jax.jit
  def step(params, batch_stats, x):
    traces.append(1)
    (loss, stats), grads = _train_step(model)(params, batch_stats, x)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    return params, stats, loss

  params, stats = variables["params"], variables["batch_stats"]
  for i in range(4):
    params, stats, _ = step(params, stats, _x((32, 4), seed=i))
  assert len(traces) == 1


def test_optax_training_reduces_the_loss():
  model = MLP()
  x = _x((64, 4))
  target = jnp.stack([x[:, 0], x[:, 1] * 2, -x[:, 2]], axis=1)
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.adam(0.05)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      y, upd = model.apply({"params": p, "batch_stats": stats}, x,
                           training=True, mutable=["batch_stats"])
      return jnp.mean((y - target) ** 2), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for _ in range(60):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]


def test_traced_training_flag_gets_a_clear_error():
  layer = jaxbn.BatchNormalization()
  x = _x()
  variables = layer.init(jax.random.PRNGKey(0), x)
  with pytest.raises(TypeError, match="static_argnames"):
    jax.jit(lambda v, x, t: layer.apply(v, x, training=t,
                                        mutable=["batch_stats"]))(
                                            variables, x, True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_and_param_dtype_as_flax(dtype):
  # dtype: the output's; param_dtype: gamma and beta's; the statistics and
  # the state float32, as flax's BatchNorm keeps them
  x = jnp.asarray(_x((32, 4, 4, 6), mean=3.0), dtype)
  ours = jaxbn.BatchNormalization(momentum=0.9, dtype=dtype,
                                  param_dtype=dtype,
                                  moving_variance_estimator="biased")
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9,
                        epsilon=1e-3, dtype=dtype, param_dtype=dtype)
  v_ours = ours.init(jax.random.PRNGKey(0), x)
  v_theirs = theirs.init(jax.random.PRNGKey(0), x)
  assert {v.dtype for v in jax.tree.leaves(v_ours["params"])} == {
      jnp.dtype(dtype)}
  assert {v.dtype for v in jax.tree.leaves(v_ours["batch_stats"])} == {
      jnp.dtype(jnp.float32)}
  assert {v.dtype for v in jax.tree.leaves(v_theirs["batch_stats"])} == {
      jnp.dtype(jnp.float32)}
  y, s = ours.apply(v_ours, x, training=True, mutable=["batch_stats"])
  y_flax, s_flax = theirs.apply(v_theirs, x, mutable=["batch_stats"])
  assert y.dtype == y_flax.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(y_flax, np.float32), atol=2e-2)
  np.testing.assert_allclose(s["batch_stats"]["moving_mean"],
                             s_flax["batch_stats"]["mean"], rtol=1e-5)
  np.testing.assert_allclose(s["batch_stats"]["moving_variance"],
                             s_flax["batch_stats"]["var"], rtol=1e-4)
  # a float32 input, bfloat16/float16 output
  y32 = ours.apply(v_ours, x.astype(jnp.float32))
  assert y32.dtype == dtype
  with pytest.raises(TypeError, match="float dtype"):
    jaxbn.BatchNormalization(param_dtype=jnp.int32).init(
        jax.random.PRNGKey(0), x)


def test_the_layer_builds_its_config_once(monkeypatch):
  # a Linen module is rebuilt on every apply; its BatchNormConfig (and the
  # validation in it) is built once for each set of arguments
  built = []
  original = jaxbn.BatchNormConfig.__post_init__

  def counting(self):
    built.append(self)
    original(self)

  monkeypatch.setattr(jaxbn.BatchNormConfig, "__post_init__", counting)
  layer = jaxbn.BatchNormalization(momentum=0.8125, epsilon=2e-3)
  x = jnp.ones((4, 3))
  # traced (an eager call keys its program on a config of its own)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
  for _ in range(3):  # every trace runs the module's Python again
    jax.make_jaxpr(lambda v, x: layer.apply(
        v, x, training=True, mutable=["batch_stats"]))(variables, x)
  assert len(built) == 1
  # 1 and 1.0 are equal but different arguments (get_config writes them)
  assert jaxbn.BatchNormalization(momentum=1).config.momentum == 1
  assert type(jaxbn.BatchNormalization(momentum=1.0).config.momentum) is float
