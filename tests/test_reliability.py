"""Numerics, edge batches, transform robustness and checkpoint safety."""
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

PATHS = {
    "fast": {},
    "general": {"fused": False},
    "ghost": {"virtual_batch_size": 4},
    "renorm": {"renorm": True},
    "renorm_ghost": {"renorm": True, "virtual_batch_size": 4},
}


def _large_mean_batch(dtype=np.float32, rows=64, channels=3, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(rows, channels) + 1e4).astype(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_variance_is_exact_for_large_means_on_every_path(path, use_mask):
  # mean 1e4, std 1 in float32: Flax's default fast variance returns 0 or 8.
  config = jaxbn.BatchNormConfig(momentum=0.0, epsilon=1e-3,
                                 moving_variance_estimator="biased",
                                 **PATHS[path])
  x = _large_mean_batch()
  mask = None
  if use_mask:
    mask = np.ones((64, 1), bool)
    mask[::5] = False
  params, state = jaxbn.init(config, x.shape)
  y, new_state = jaxbn.apply(config, params, state, x, training=True,
                             mask=mask)
  xx = np.asarray(x, np.float64)
  keep = np.ones(64, bool) if mask is None else mask[:, 0]
  if config.virtual_batch_size is None:
    true_var = xx[keep].var(0)
  else:  # mean over virtual batches of their variances (count-weighted)
    groups = [np.arange(g, 64, 64 // 4) for g in range(64 // 4)]
    counts = np.array([keep[g].sum() for g in groups])
    true_var = sum(c * xx[g][keep[g]].var(0) for g, c in zip(groups, counts)
                   if c) / counts.sum()
  np.testing.assert_allclose(new_state["moving_variance"], true_var,
                             rtol=2e-3)
  assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_on_every_path(path, dtype):
  config = jaxbn.BatchNormConfig(momentum=0.0, **PATHS[path],
                                 moving_variance_estimator="biased")
  rng = np.random.RandomState(1)
  x32 = (rng.randn(64, 5) * 2 + 300).astype(np.float32)
  x = jnp.asarray(x32, dtype)
  params, state = jaxbn.init(config, x.shape)
  y, new_state = jaxbn.apply(config, params, state, x, training=True)
  assert y.dtype == dtype
  assert all(v.dtype == jnp.float32 for k, v in new_state.items()
             if k != "renorm_step")
  assert float(jnp.min(new_state["moving_variance"])) > 1.0  # never 0
  y_inf, _ = jaxbn.apply(config, params, new_state, x, training=False)
  assert y_inf.dtype == dtype
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxbn.apply(
      config, p, state, x, training=True)[0].astype(jnp.float32) ** 2),
                           argnums=(0, 1)))(params, x)
  assert grads[1].dtype == dtype
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("path", PATHS)
def test_batch_of_one_gives_beta_and_keeps_keras_update(path):
  kwargs = dict(PATHS[path])
  kwargs.pop("virtual_batch_size", None)
  config = jaxbn.BatchNormConfig(momentum=0.5, **kwargs)
  x = jnp.asarray([[3.0, -2.0, 7.0]])
  params, state = jaxbn.init(config, x.shape)
  params = {"gamma": params["gamma"] * 2, "beta": params["beta"] + 0.25}
  y, new_state = jaxbn.apply(config, params, state, x, training=True)
  # x - mean(x) == 0 for a single example: the output is beta (Keras too),
  # plus renorm's correction d * gamma with d = (x - renorm_mean) / sigma;
  # the zero batch variance enters the moving variance, as in Keras.
  d = x if config.renorm else 0.0  # renorm_mean 0, renorm_stddev 1
  np.testing.assert_allclose(y, d * 2 + 0.25)
  np.testing.assert_allclose(new_state["moving_mean"], 0.5 * x[0])
  assert np.all(np.asarray(new_state["moving_variance"]) < 1.0)


@pytest.mark.parametrize("path", PATHS)
def test_no_valid_element_keeps_the_state(path):
  config = jaxbn.BatchNormConfig(momentum=0.5, **PATHS[path])
  x = jnp.asarray(np.random.RandomState(2).randn(8, 3), jnp.float32)
  params, state = jaxbn.init(config, x.shape)
  y, new_state = jaxbn.apply(config, params, state, x, training=True,
                             mask=jnp.zeros((8, 1), bool))
  assert np.all(np.isfinite(np.asarray(y)))
  for k in state:
    np.testing.assert_array_equal(new_state[k], state[k])
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxbn.apply(
      config, params, state, x, training=True,
      mask=jnp.zeros((8, 1), bool))[0] ** 2)))(x)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1e3, 1e15])
def test_constant_channels_and_extreme_magnitudes_stay_finite(path,
                                                              magnitude):
  config = jaxbn.BatchNormConfig(momentum=0.5, **PATHS[path])
  rng = np.random.RandomState(3)
  x = (rng.randn(8, 4) * magnitude).astype(np.float32)
  x[:, 0] = 5.0 * magnitude  # a constant channel
  params, state = jaxbn.init(config, x.shape)
  y, new_state = jaxbn.apply(config, params, state, x, training=True)
  assert np.all(np.isfinite(np.asarray(y)))
  # renorm adds d = (mean - renorm_mean) / renorm_stddev = mean initially
  expected = 5.0 * magnitude if config.renorm else 0.0
  if magnitude <= 1e3:
    np.testing.assert_allclose(np.asarray(y)[:, 0], expected, rtol=1e-5,
                               atol=1e-6)
  else:
    # At 5e15 the float32 mean itself is off by ~ulp(5e15) and the channel's
    # "variance" is that rounding error squared, so (x - mean) / std is
    # bounded by 1 but not 0: documented, and the same in any float32 BN.
    assert np.all(np.abs(np.asarray(y)[:, 0] - expected)
                  <= 1.0 + 1e-5 * abs(expected))
  for v in new_state.values():
    assert np.all(np.isfinite(np.asarray(v)))
  g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(jaxbn.apply(
      config, params, state, x, training=True)[0]))))(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_batches_follow_keras_unless_guarded(path):
  x = np.random.RandomState(4).randn(8, 3).astype(np.float32)
  x[2, 1] = np.nan
  x[5, 2] = np.inf
  keras_like = jaxbn.BatchNormConfig(momentum=0.5, **PATHS[path])
  guarded = jaxbn.BatchNormConfig(momentum=0.5, skip_nonfinite_updates=True,
                                  **PATHS[path])
  params, state = jaxbn.init(keras_like, x.shape)
  _, poisoned = jaxbn.apply(keras_like, params, state, x, training=True)
  assert np.isnan(np.asarray(poisoned["moving_mean"])[1])
  _, kept = jaxbn.apply(guarded, params, state, x, training=True)
  for k in state:
    value = np.asarray(kept[k])
    assert np.all(np.isfinite(value)), k
    if value.ndim:
      # the bad channels keep their values, the clean channel is updated
      np.testing.assert_array_equal(value[1:], np.asarray(state[k])[1:])
  assert float(kept["moving_mean"][0]) != float(state["moving_mean"][0])


def test_same_inputs_give_bitwise_identical_results():
  config = jaxbn.BatchNormConfig(renorm=True)
  x = jnp.asarray(np.random.RandomState(5).randn(32, 8), jnp.float32)
  params, state = jaxbn.init(config, x.shape)
  step = jax.jit(lambda p, s, x: jaxbn.apply(config, p, s, x, training=True))
  a = step(params, state, x)
  b = step(params, state, x)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_state_donation_works():
  config = jaxbn.BatchNormConfig()
  x = jnp.asarray(np.random.RandomState(6).randn(16, 4), jnp.float32)
  params, state = jaxbn.init(config, x.shape)
  expected = jaxbn.apply(config, params, state, x, training=True)[1]
  step = jax.jit(lambda s, x: jaxbn.apply(config, params, s, x,
                                          training=True)[1],
                 donate_argnums=0)
  donated = jax.tree_util.tree_map(jnp.copy, state)
  new_state = step(donated, x)
  for k in expected:
    np.testing.assert_array_equal(new_state[k], expected[k])


def test_checkpointed_state_continues_bit_exactly(tmp_path):
  layer = jaxbn.BatchNormalization(momentum=0.8, renorm=True,
                                   renorm_clipping={"rmax": 2.0})
  batches = [jnp.asarray(np.random.RandomState(i).randn(16, 4) * 2 + i,
                         jnp.float32) for i in range(6)]
  variables = layer.init(jax.random.PRNGKey(0), batches[0])
  step = jax.jit(lambda v, x: layer.apply(v, x, training=True,
                                          mutable=["batch_stats"])[1])

  def train(variables, xs):
    for x in xs:
      variables = {**variables, **step(variables, x)}
    return variables

  middle = train(variables, batches[:3])
  path = tmp_path / "middle.msgpack"
  path.write_bytes(flax.serialization.to_bytes(middle))
  straight = train(middle, batches[3:])
  restored = flax.serialization.from_bytes(middle, path.read_bytes())
  resumed = train(restored, batches[3:])
  for a, b in zip(jax.tree_util.tree_leaves(straight),
                  jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_functional_core_under_lax_scan_over_batches():
  config = jaxbn.BatchNormConfig(momentum=0.5, renorm=True)
  xs = jnp.asarray(np.random.RandomState(8).randn(5, 16, 3) * 2 + 1,
                   jnp.float32)
  params, state = jaxbn.init(config, xs.shape[1:])

  def body(state, x):
    y, state = jaxbn.apply(config, params, state, x, training=True)
    return state, y

  final, ys = jax.lax.scan(body, state, xs)
  loop = state
  for i, x in enumerate(xs):
    y, loop = jaxbn.apply(config, params, loop, x, training=True)
    np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
  for k in loop:
    np.testing.assert_allclose(final[k], loop[k], rtol=1e-6)


@pytest.mark.parametrize("call,error,match", [
    (lambda: jaxbn.init(jaxbn.BatchNormConfig(), (4, 3), dtype=jnp.int32),
     TypeError, "float dtype"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), *jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3)), jnp.ones((4, 3)), training=True,
                         mask=jnp.ones((4, 3), jnp.complex64)),
     TypeError, "`mask` must be boolean"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), *jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3)), jnp.ones((4, 3)), training=True,
                         mask=jnp.ones((2, 4, 3), bool)),
     ValueError, "does not align"),
    (lambda: jaxbn.init(jaxbn.BatchNormConfig(
        gamma_initializer="random_normal"), (4, 3)),
     ValueError, "PRNG key"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(renorm=True), *jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3)), jnp.ones((4, 3)), training=True),
     ValueError, "renorm=True needs state entries"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(accumulation_steps=3),
                         *jaxbn.init(jaxbn.BatchNormConfig(), (4, 3)),
                         jnp.ones((4, 3)), training=True),
     ValueError, r"accumulation_steps=3 needs state entries \['accumulated_"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(renorm=True, renorm_clipping={
        "rmax": lambda step: 1.0 + step}), *jaxbn.init(jaxbn.BatchNormConfig(
            renorm=True), (4, 3)), jnp.ones((4, 3)), training=True),
     ValueError, r"scheduled `renorm_clipping` bound needs state entries "
                 r"\['renorm_step'\]"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3))[0], {}, jnp.ones((4, 3)),
                         training=True),
     ValueError, r"`state` has no \['moving_mean', 'moving_variance'\]"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), *jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3)), jnp.ones((4, 3)), training=True,
                         mask="abc"),
     TypeError, "`mask` must be boolean .* got str"),
    (lambda: jaxbn.BatchNormConfig(renorm=True,
                                   renorm_clipping={"rmax": 0.5}),
     ValueError, r"renorm_clipping\['rmax'\]`=0.5 is below 1"),
    (lambda: jaxbn.BatchNormConfig(renorm=True,
                                   renorm_clipping={"rmin": 1.5}),
     ValueError, r"renorm_clipping\['rmin'\]`=1.5 is above 1"),
    (lambda: jaxbn.BatchNormConfig(renorm=True, renorm_clipping={
        "rmin": 0.5, "rmax": 0.2}), ValueError, "rmax"),
    (lambda: jaxbn.apply(
        jaxbn.BatchNormConfig(adjustment=lambda shape, key: (
            jnp.ones((7,)), jnp.zeros((3,)))),
        *jaxbn.init(jaxbn.BatchNormConfig(), (4, 3)), jnp.ones((4, 3)),
        training=True, key=jax.random.key(0)),
     ValueError, r"`adjustment` returned a scale of shape"),
    (lambda: jaxbn.apply(
        jaxbn.BatchNormConfig(adjustment=lambda shape, key: (
            jax.random.uniform(key, shape[-1:]), jnp.zeros(shape[-1:]))),
        *jaxbn.init(jaxbn.BatchNormConfig(), (4, 3)), jnp.ones((4, 3)),
        training=True),
     ValueError, r"failed with key=None: no key was given. Pass key="),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), None, jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3))[1], jnp.ones((4, 3)), training=True),
     TypeError, r"`params` must be a dict of arrays; got NoneType"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), jaxbn.init(
        jaxbn.BatchNormConfig(), (4, 3))[0], None, jnp.ones((4, 3)),
                         training=False),
     TypeError, r"`state` must be a dict of arrays; got NoneType"),
    (lambda: jaxbn.apply(jaxbn.BatchNormConfig(), {
        "gamma": [1.0, 1.0, 1.0], "beta": [0.0, 0.0, 0.0]}, jaxbn.init(
            jaxbn.BatchNormConfig(), (4, 3))[1], jnp.ones((4, 3)),
                         training=True),
     TypeError, r"`params\['gamma'\]` must be an array; got list.*"
     r"jnp.asarray"),
])
def test_more_bad_inputs_raise_clear_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.parametrize("name", ["moving_stddev", "renorm_mean",
                                  "renorm_stddev"])
def test_a_wrongly_shaped_renorm_statistic_is_named(name):
  config = jaxbn.BatchNormConfig(renorm=True)
  params, state = jaxbn.init(config, (4, 3))
  state[name] = jnp.ones((5,))
  for training in (True, False):
    with pytest.raises(ValueError, match=f"'{name}' has shape \\(5,\\) but "
                       r"an input of shape \(4, 3\).* needs \(3,\)"):
      jaxbn.apply(config, params, state, jnp.ones((4, 3)), training=training)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", ["moving_mean", "moving_variance",
                                  "renorm_stddev"])
def test_state_narrower_than_float32_is_refused_by_name(dtype, name):
  config = jaxbn.BatchNormConfig(renorm=True)
  params, state = jaxbn.init(config, (4, 3))
  state[name] = state[name].astype(dtype)
  with pytest.raises(TypeError, match=f"`state\\['{name}'\\]` has dtype "
                     f"{jnp.dtype(dtype).name}; it must be float32 .*astype"):
    jaxbn.apply(config, params, state, jnp.ones((4, 3)), training=True)


def test_state_is_float32_at_least_and_its_average_does_not_stall():
  config = jaxbn.BatchNormConfig(momentum=0.99)
  for dtype, expected in ((jnp.bfloat16, jnp.float32),
                          (jnp.float16, jnp.float32),
                          (jnp.float32, jnp.float32)):
    params, state = jax.eval_shape(
        lambda: jaxbn.init(config, (4, 3), dtype=dtype))
    assert {v.dtype for v in params.values()} == {jnp.dtype(dtype)}
    assert {v.dtype for v in state.values()} == {jnp.dtype(expected)}
  # float16 parameters are fine; the average moves by (1 - momentum) * 10
  # per step toward 1010 from 1000, below float16's half ulp there (0.25)
  params, state = jaxbn.init(config, (64, 2), dtype=jnp.float16)
  state = jax.tree.map(lambda v: v + 1000.0, state)
  x = np.random.RandomState(0).randn(64, 2).astype(np.float32)
  x = x - x.mean(0) + 1010.0
  expected = np.full(2, 1000.0)
  for _ in range(230):
    _, state = jaxbn.apply(config, params, state, x, training=True)
    expected = 0.99 * expected + 0.01 * np.float64(x.mean(0))
  np.testing.assert_allclose(state["moving_mean"], expected, rtol=1e-6)
  assert expected[0] > 1009.0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0, 4, 4, 3), (8, 0), (8, 2, 0)])
def test_empty_inputs_give_empty_outputs_and_keep_the_state(path, shape):
  config = jaxbn.BatchNormConfig(**PATHS[path], momentum=0.5)
  params, state = jaxbn.init(config, shape)
  state = jax.tree.map(lambda v: v + 0.5, state)
  x = jnp.zeros(shape)
  for training in (True, False):
    y, new_state = jax.jit(lambda p, x: jaxbn.apply(
        config, p, state, x, training=training))(params, x)
    assert y.shape == shape and y.dtype == x.dtype
    for k in state:
      np.testing.assert_array_equal(new_state[k], state[k])
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxbn.apply(
      config, p, state, x, training=True)[0]), argnums=(0, 1)))(params, x)
  assert grads[1].shape == shape
  assert all(not np.any(g) for g in jax.tree.leaves(grads[0]))
