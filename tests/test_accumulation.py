"""Gradient accumulation (``accumulation_steps = k``): k micro-batch calls
and their summed gradient equal one call on the stacked micro-batches with
contiguous virtual batches, in outputs, gradients and state; with the
micro-batches taken as Keras' strided virtual batches, tf_keras' ghost batch
norm; across devices, one device's."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jaxbn
from jaxbn import config as config_lib
from tests import keras_oracle

def _with(config, **changes):
  fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
  return jaxbn.BatchNormConfig(**{**fields, **changes})


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, size=shape[-1]) + \
      rng.uniform(-2, 2, size=shape[-1])
  return (jnp.asarray(x, jnp.float32),
          jnp.asarray(rng.normal(size=shape), jnp.float32))


def _call(config, params, state, x, dy, mask=None, axis_name=None):
  """``(y, dparams, dx, new_state)`` of one training call, loss ``sum(y dy)``."""
  def f(params, x):
    return jaxbn.apply(config, params, state, x, training=True, mask=mask,
                       axis_name=axis_name)
  (y, new_state), vjp = jax.vjp(f, params, x)
  dparams, dx = vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))
  return y, dparams, dx, new_state


def _accumulated(config, params, state, x, dy, k, mask=None):
  """k calls on the contiguous micro-batches of x: outputs and dx stacked,
  parameter gradients summed, the state after each call."""
  m = x.shape[0] // k
  ys, dxs, states, dparams = [], [], [], None
  step = jax.jit(lambda p, s, x, dy, mask: _call(config, p, s, x, dy, mask))
  for i in range(k):
    rows = slice(i * m, (i + 1) * m)
    y, dp, dx, state = step(params, state, x[rows], dy[rows],
                            None if mask is None else mask[rows])
    ys.append(y)
    dxs.append(dx)
    states.append(state)
    dparams = dp if dparams is None else jax.tree.map(jnp.add, dparams, dp)
  return jnp.concatenate(ys), dparams, jnp.concatenate(dxs), states


def _assert_tree_close(actual, expected, what, rtol=2e-5, atol=2e-6):
  for name in expected:
    np.testing.assert_allclose(np.asarray(actual[name]),
                               np.asarray(expected[name]), rtol=rtol,
                               atol=atol, err_msg=f"{what}: {name}")


STATISTICS = ("moving_mean", "moving_variance", "moving_stddev",
              "renorm_mean", "renorm_stddev", "renorm_step")


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("base,shape,masked", [
    (jaxbn.BatchNormConfig(moving_variance_estimator="unbiased"),
     (16, 3, 3, 5), False),
    (jaxbn.BatchNormConfig(momentum=0.8, epsilon=1e-2, activation="relu",
                           moving_variance_estimator="biased"),
     (16, 6), True),
    (jaxbn.BatchNormConfig(axis=[1, 3], momentum=0.5, center=False),
     (16, 2, 3, 4), False),
    (jaxbn.BatchNormConfig(renorm=True, momentum=0.7, renorm_momentum=0.6,
                           renorm_clipping={"rmax": 1.5, "dmax": 0.5,
                                            "rmin": lambda step: 0.9 - 0 * step}),
     (16, 5), False),
], ids=["nhwc-unbiased", "relu-masked", "axis-list", "renorm"])
def test_k_calls_equal_one_call_with_contiguous_virtual_batches(
    base, shape, masked, k):
  x, dy = _inputs(shape, seed=k)
  mask = (jnp.arange(shape[0]) % 5 != 3) if masked else None
  ghost = _with(base, virtual_batch_size=shape[0] // k,
                virtual_batch_layout="contiguous")
  accumulating = _with(base, accumulation_steps=k)
  params, ghost_state = jaxbn.init(ghost, shape)
  params = jax.tree.map(lambda v: v * 1.3 + 0.2, params)
  ghost_state = jax.tree.map(lambda v: v + 0.5 if v.dtype == jnp.float32
                             else v, ghost_state)
  _, state = jaxbn.init(accumulating, shape)
  state = {**state, **ghost_state}
  ghost_step = jax.jit(lambda p, s, x, dy: _call(ghost, p, s, x, dy, mask))
  for round_ in range(2):  # the accumulator resets after each update
    y_g, dp_g, dx_g, ghost_state = ghost_step(params, ghost_state, x, dy)
    y_a, dp_a, dx_a, states = _accumulated(accumulating, params, state, x, dy,
                                           k, mask)
    before = state
    state = states[-1]
    for i, s in enumerate(states[:-1]):  # no update before the k-th call
      assert int(s["accumulation_step"]) == i + 1
      _assert_tree_close(s, {n: before[n] for n in STATISTICS if n in before},
                         f"call {i + 1} of {k}", rtol=0, atol=0)
    assert int(state["accumulation_step"]) == 0
    _assert_tree_close(state, {n: v for n, v in ghost_state.items()},
                       f"state after round {round_}")
    if not base.renorm:
      # renorm's r/d: each micro-batch against the accumulation's start
      # averages, where the virtual batches share the merged statistics
      np.testing.assert_allclose(y_a, y_g, rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(dx_a, dx_g, rtol=2e-4, atol=2e-5)
      _assert_tree_close(dp_a, dp_g, "parameter gradients", rtol=2e-4,
                         atol=2e-5)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, dp_a)
    x, dy = x[::-1] * 1.1 + 0.3, -dy


def test_a_channel_spread_beyond_float32_squares_accumulates_in_units():
  # the accumulator keeps the statistics in units (stats.in_units): the
  # renorm and moving standard deviations of a channel spread by 1e25 equal
  # the virtual batches' ones
  k, shape = 2, (8, 3)
  x, _ = _inputs(shape, seed=4)
  x = x.at[:, 0].multiply(1e25).at[:4, 1].add(1e22)
  base = jaxbn.BatchNormConfig(renorm=True, momentum=0.5,
                               moving_variance_estimator="biased")
  ghost = _with(base, virtual_batch_size=4, virtual_batch_layout="contiguous")
  accumulating = _with(base, accumulation_steps=k)
  params, ghost_state = jaxbn.init(ghost, shape)
  _, state = jaxbn.init(accumulating, shape)
  _, ghost_state = jaxbn.apply(ghost, params, ghost_state, x, training=True)
  for i in range(k):
    _, state = jaxbn.apply(accumulating, params, state, x[4 * i:4 * i + 4],
                           training=True)
  assert np.all(np.isfinite(state["moving_stddev"]))
  assert float(state["moving_stddev"][0]) > 1e23
  _assert_tree_close(state, ghost_state, "state", rtol=1e-5)


def test_renorm_corrections_come_from_each_micro_batch_and_the_start_averages():
  # r = clip(s_i / sigma, ...), d = clip((mu_i - renorm_mean) / sigma, ...)
  # with s_i, mu_i the micro-batch's and renorm_mean/sigma the averages at
  # the start of the accumulation: each call's output is that of a plain
  # renorm layer from the start state
  shape, k = (12, 4), 3
  x, dy = _inputs(shape, seed=3)
  base = jaxbn.BatchNormConfig(renorm=True, renorm_clipping={"rmax": 1.2,
                                                             "dmax": 0.3})
  accumulating = _with(base, accumulation_steps=k)
  params, state = jaxbn.init(accumulating, shape)
  state = {**state, "renorm_mean": state["renorm_mean"] + 0.7,
           "renorm_stddev": state["renorm_stddev"] * 0.6}
  _, plain_state = jaxbn.init(base, shape)
  plain_state = {n: state[n] for n in plain_state}
  ys, _, _, _ = _accumulated(accumulating, params, state, x, dy, k)
  for i in range(k):
    rows = slice(i * 4, (i + 1) * 4)
    alone, _ = jaxbn.apply(base, params, plain_state, x[rows], training=True)
    np.testing.assert_allclose(ys[rows], alone, rtol=1e-6, atol=1e-6)


def test_micro_batches_as_keras_strided_virtual_batches_match_tf_keras():
  # micro-batch g = rows g, g + k, g + 2k, ... (Keras' strided virtual batch
  # g); two optimizer steps of plain SGD on gamma and beta
  k, lr = 4, 0.05
  shape = (16, 3, 2, 5)
  kwargs = {"momentum": 0.9, "epsilon": 1e-2,
            "virtual_batch_size": shape[0] // k}
  xs, dys = keras_oracle.make_inputs(shape, 2, seed=11)
  initial, records, _, _ = keras_oracle.run_keras(kwargs, xs, dys, lr=lr)
  config = jaxbn.BatchNormConfig(momentum=0.9, epsilon=1e-2,
                                 accumulation_steps=k,
                                 moving_variance_estimator="biased")
  params_like, state = jaxbn.init(config, shape)
  # Keras' ghost layer keeps its variables with the virtual-batch axis
  params = {n: jnp.asarray(initial[n]).reshape(v.shape)
            for n, v in params_like.items()}
  state = {**state, **{n: jnp.asarray(initial[n]).reshape(state[n].shape)
                       for n in ("moving_mean", "moving_variance")}}
  step = jax.jit(lambda p, s, x, dy: _call(config, p, s, x, dy))
  for x, dy, rec in zip(xs, dys, records):
    y, dx = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    dparams = jax.tree.map(jnp.zeros_like, params)
    for g in range(k):
      yg, dp, dxg, state = step(params, state, jnp.asarray(x[g::k]),
                                jnp.asarray(dy[g::k]))
      y[g::k], dx[g::k] = yg, dxg
      dparams = jax.tree.map(jnp.add, dparams, dp)
    keras_oracle.assert_close(y, rec["y"], 2e-4, "y")
    keras_oracle.assert_close(dx, rec["dx"], 2e-4, "dx")
    for n in params:
      keras_oracle.assert_close(dparams[n], rec["d" + n].reshape(-1), 2e-4,
                                "d" + n)
    for n in ("moving_mean", "moving_variance"):
      keras_oracle.assert_close(state[n], rec["state"][n].reshape(-1), 2e-4,
                                n)
    params = {n: p - lr * dparams[n] for n, p in params.items()}


def test_accumulation_across_devices_equals_one_device():
  # 4 devices, axis_name: every micro-batch's statistics cross the devices,
  # and so does the merge the state follows
  k, shape = 3, (24, 6)
  x, dy = _inputs(shape, seed=5)
  config = jaxbn.BatchNormConfig(accumulation_steps=k, momentum=0.6)
  params, state = jaxbn.init(config, shape)
  _, dp_one, dx_one, states_one = _accumulated(config, params, state, x, dy,
                                               k)
  mesh = Mesh(jax.devices()[:4], ("data",))

  @jax.jit
  def sharded(params, state, x, dy):
    def call(params, state, x, dy):
      y, dp, dx, new_state = _call(config, params, state, x, dy,
                                   axis_name="data")
      return jax.lax.psum(dp, "data"), dx, new_state
    return jax.shard_map(call, mesh=mesh,
                         in_specs=(P(), P(), P("data"), P("data")),
                         out_specs=(P(), P("data"), P()))(params, state, x, dy)

  m = shape[0] // k
  for i in range(k):
    rows = slice(i * m, (i + 1) * m)
    dp, dx, state = sharded(params, state, x[rows], dy[rows])
    np.testing.assert_allclose(dx, dx_one[rows], rtol=1e-4, atol=1e-5)
    _assert_tree_close(state, states_one[i], f"call {i}")


def test_optax_multi_steps_with_a_linen_model_updates_once_per_k_calls():
  k = 3
  x, dy = _inputs((12, 4), seed=8)
  layer = jaxbn.BatchNormalization(accumulation_steps=k, momentum=0.5)
  variables = layer.init(jax.random.key(0), x[:4], training=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  assert set(config_lib.ACCUMULATOR_NAMES) < set(batch_stats)
  optimizer = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k)
  opt_state = optimizer.init(params)

  loss = _loss(layer)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, dy):
    grads, batch_stats = jax.grad(loss, has_aux=True)(params, batch_stats, x,
                                                      dy)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  start = params
  for i in range(k):
    params, batch_stats, opt_state = train_step(
        params, batch_stats, opt_state, x[4 * i:4 * i + 4], dy[4 * i:4 * i + 4])
  # one SGD step with the micro-batches' mean gradient; one EMA step
  ghost = jaxbn.BatchNormalization(momentum=0.5, virtual_batch_size=4,
                                   virtual_batch_layout="contiguous")
  ghost_stats = {n: variables["batch_stats"][n]
                 for n in ("moving_mean", "moving_variance")}
  grads, ghost_stats = jax.grad(_loss(ghost), has_aux=True)(
      start, ghost_stats, x, dy)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g / k, start, grads)
  _assert_tree_close(params, expected, "parameters", rtol=1e-5)
  _assert_tree_close(batch_stats, ghost_stats, "moving statistics")


def _loss(layer):
  def loss(params, batch_stats, x, dy):
    y, updates = layer.apply({"params": params, "batch_stats": batch_stats},
                             x, training=True, mutable=["batch_stats"])
    return jnp.sum(y * dy), updates["batch_stats"]
  return loss


def test_nnx_layer_accumulates_and_inference_is_unaffected():
  from flax import nnx
  k = 2
  x, _ = _inputs((8, 3), seed=9)
  layer = jaxbn.nnx.BatchNormalization(3, accumulation_steps=k,
                                       rngs=nnx.Rngs(0))
  start = np.asarray(layer.moving_mean.value)
  layer(x[:4], training=True)
  np.testing.assert_array_equal(layer.moving_mean.value, start)
  layer(x[4:], training=True)
  ghost_state = jaxbn.apply(
      jaxbn.BatchNormConfig(virtual_batch_size=4,
                            virtual_batch_layout="contiguous"),
      {"gamma": jnp.ones(3), "beta": jnp.zeros(3)},
      {"moving_mean": jnp.zeros(3), "moving_variance": jnp.ones(3)}, x,
      training=True)[1]
  np.testing.assert_allclose(layer.moving_mean.value,
                             ghost_state["moving_mean"], rtol=1e-6)
  y = layer(x, training=False)
  plain = jaxbn.apply(jaxbn.BatchNormConfig(), {"gamma": jnp.ones(3),
                                                "beta": jnp.zeros(3)},
                      {"moving_mean": layer.moving_mean.value,
                       "moving_variance": layer.moving_variance.value}, x,
                      training=False)[0]
  np.testing.assert_allclose(y, plain, rtol=1e-6)


def test_bad_accumulation_steps_and_exports_are_refused():
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="accumulation_steps"):
      jaxbn.BatchNormConfig(accumulation_steps=bad)
  config = jaxbn.BatchNormConfig(accumulation_steps=2)
  assert jaxbn.BatchNormConfig.from_config(config.get_config()) == config
  layer = jaxbn.BatchNormalization(accumulation_steps=2)
  with pytest.raises(ValueError, match="accumulation_steps=2"):
    jaxbn.keras_config(layer, (4, 3))
  params, state = jaxbn.init(jaxbn.BatchNormConfig(), (4, 3))
  with pytest.raises(ValueError, match="accumulation_step"):
    jaxbn.apply(config, params, state, jnp.ones((4, 3)), training=True)
