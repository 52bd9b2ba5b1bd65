"""The functional core against a NumPy float64 reference, and its gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from tests import numpy_reference

CASES = [
    dict(shape=(16, 5), axis=-1),
    dict(shape=(6, 4, 5), axis=[1, 2]),
    dict(shape=(4, 3, 3, 5), axis=-1),
    dict(shape=(4, 5, 3, 3), axis=1, mask=True),
    dict(shape=(16, 3, 4), axis=-1, virtual_batch_size=4),
    dict(shape=(16, 3, 4), axis=-1, virtual_batch_size=4, mask=True),
    dict(shape=(12, 4), axis=-1, renorm=True, rmax=1.1, rmin=0.9, dmax=0.2),
    dict(shape=(8, 3, 4), axis=-1, renorm=True, virtual_batch_size=2),
    dict(shape=(16, 5), axis=-1, fused=False, mask=True),
]


def _random_state(config, shape, rng):
  params, state = jaxbn.init(config, shape)
  params = {k: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32)
            for k, v in params.items()}
  state = {k: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32)
           for k, v in state.items()}
  return params, state


@pytest.mark.parametrize("case", CASES, ids=str)
def test_training_matches_float64_reference(case):
  case = dict(case)
  shape, use_mask = case.pop("shape"), case.pop("mask", False)
  clip = {k: case.pop(k) for k in ("rmin", "rmax", "dmax") if k in case}
  kwargs = dict(case, momentum=0.8, epsilon=1e-3)
  if clip:
    kwargs["renorm_clipping"] = clip
  config = jaxbn.BatchNormConfig(**kwargs)
  rng = np.random.RandomState(0)
  x = (rng.randn(*shape) * 3 + 5).astype(np.float32)
  mask = (rng.rand(shape[0], *([1] * (len(shape) - 1))) > 0.3
          if use_mask else None)
  params, state = _random_state(config, shape, rng)
  y, new_state = jaxbn.apply(config, params, state, x, training=True,
                             mask=mask)
  resolved = config.resolve(shape)
  y_ref, state_ref = numpy_reference.batch_norm_train(
      x, params.get("gamma"), params.get("beta"),
      {k: np.asarray(v) for k, v in state.items()}, axes=resolved.axes,
      momentum=0.8, epsilon=1e-3, mask=mask,
      virtual_batch_size=case.get("virtual_batch_size"),
      renorm=case.get("renorm", False), **clip,
      bessel=config.bessel_corrected_moving_variance(resolved))
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  for k in state_ref:
    np.testing.assert_allclose(new_state[k], state_ref[k], rtol=2e-5,
                               atol=1e-6, err_msg=k)
  y_inf, same = jaxbn.apply(config, params, new_state, x, training=False)
  y_inf_ref = numpy_reference.batch_norm_inference(
      x, params.get("gamma"), params.get("beta"),
      {k: np.asarray(v) for k, v in new_state.items()}, axes=resolved.axes,
      epsilon=1e-3)
  np.testing.assert_allclose(y_inf, y_inf_ref, rtol=2e-5, atol=2e-5)
  assert same is not new_state and all(
      same[k] is new_state[k] for k in new_state)


GRAD_CASES = [
    dict(),
    dict(fused=False),
    dict(axis=[1, 2]),
    # r and d carry no gradient by design; pin them so that finite
    # differences see the same function (the Keras oracle covers the rest).
    dict(renorm=True, renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}),
    dict(virtual_batch_size=2),
    dict(center=False, scale=False),
]


@pytest.mark.parametrize("kwargs", GRAD_CASES, ids=str)
@pytest.mark.parametrize("use_mask", [False, True])
def test_gradients_match_finite_differences_in_float64(kwargs, use_mask):
  with jax.enable_x64(True):
    config = jaxbn.BatchNormConfig(**kwargs)
    rng = np.random.RandomState(1)
    shape = (8, 3, 4)
    x = jnp.asarray(rng.randn(*shape) * 2 + 1)
    mask = jnp.asarray(rng.rand(8, 1, 1) > 0.3) if use_mask else None
    params, state = jaxbn.init(config, shape, dtype=jnp.float64)
    params = {k: v + jnp.asarray(rng.uniform(-0.3, 0.3, v.shape))
              for k, v in params.items()}
    weights = jnp.asarray(rng.randn(*shape))

    def loss(params, x):
      y, new_state = jaxbn.apply(config, params, state, x, training=True,
                                 mask=mask)
      # padding's outputs are constants by definition: a loss reads the
      # valid ones
      valid = True if mask is None else mask
      return jnp.sum(jnp.where(valid, jnp.sin(y) * weights, 0)) + jnp.sum(
          new_state["moving_mean"] * 0)

    check_grads(loss, (params, x), order=2, modes=["rev"], atol=1e-5,
                rtol=1e-5)


def test_fused_path_gradients_equal_autodiff_path():
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(8, 4, 4, 6) * 3 + 2, jnp.float32)
  mask = jnp.asarray(rng.rand(8, 4, 1, 1) > 0.5)
  dy = jnp.asarray(rng.randn(*x.shape), jnp.float32)
  out = {}
  for fused in (None, False):
    config = jaxbn.BatchNormConfig(fused=fused)
    params, state = jaxbn.init(config, x.shape)
    params = {"gamma": params["gamma"] * 1.5, "beta": params["beta"] + 0.3}
    f = lambda p, x: jaxbn.apply(config, p, state, x, training=True,
                                 mask=mask)[0]
    y, vjp = jax.vjp(f, params, x)
    out[fused] = (y, vjp(dy))
  for a, b in zip(jax.tree_util.tree_leaves(out[None]),
                  jax.tree_util.tree_leaves(out[False])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_custom_vjp_differentiates_every_output():
  # jaxbn.apply stops gradients into the state, but the fused building block
  # is differentiable in all its outputs (statistics included).
  from jaxbn.closed_form import batch_norm_train
  with jax.enable_x64(True):
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(6, 3) * 2 + 1)
    w = jnp.asarray(rng.rand(6, 1) > 0.3, jnp.float64)
    c = jnp.asarray(rng.randn(3))

    def f(x, gamma, beta):
      y, (mean, var, _), _ = batch_norm_train(x, gamma, beta, w, (), (0,),
                                              1e-3, None, None, None)
      return (jnp.sum(jnp.where(w > 0, jnp.sin(y), 0)) + jnp.sum(mean * c)
              + jnp.sum(var ** 2))

    check_grads(f, (x, jnp.ones((1, 3)) * 1.3, jnp.zeros((1, 3)) + 0.2),
                order=2, modes=["rev"])


def test_bf16_and_f16_keep_float32_statistics_and_their_dtype():
  rng = np.random.RandomState(4)
  x32 = rng.randn(64, 8).astype(np.float32) * 2 + 100
  for dtype in (jnp.bfloat16, jnp.float16):
    config = jaxbn.BatchNormConfig(momentum=0.0)
    params, state = jaxbn.init(config, x32.shape)
    x = jnp.asarray(x32, dtype)
    y, new_state = jaxbn.apply(config, params, state, x, training=True)
    assert y.dtype == dtype
    assert new_state["moving_mean"].dtype == jnp.float32
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(new_state["moving_variance"],
                               xf.var(0), rtol=1e-3)
    y_inf, _ = jaxbn.apply(config, params, new_state, x, training=False)
    assert y_inf.dtype == dtype


def test_scheduled_renorm_clipping_uses_the_step_counter():
  schedule = lambda step: 1.0 + 0.5 * jnp.minimum(step, 2)
  config = jaxbn.BatchNormConfig(renorm=True, momentum=0.5,
                                 renorm_clipping={"rmax": schedule,
                                                  "rmin": 0.0})
  x = jnp.asarray(np.random.RandomState(5).randn(32, 3) * 10)
  params, state = jaxbn.init(config, x.shape)
  assert int(state["renorm_step"]) == 0
  fixed = {}
  for rmax in (1.0, 1.5, 2.0, 2.0):
    fixed[rmax] = jaxbn.BatchNormConfig(renorm=True, momentum=0.5,
                                        renorm_clipping={"rmax": rmax})
  fixed_state = {k: v for k, v in state.items() if k != "renorm_step"}
  for step, rmax in enumerate((1.0, 1.5, 2.0, 2.0)):
    y, state = jaxbn.apply(config, params, state, x, training=True)
    y_ref, fixed_state = jaxbn.apply(fixed[rmax], params, fixed_state, x,
                                     training=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)
    assert int(state["renorm_step"]) == step + 1


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("strategy", ["two_pass", "shifted"])
def test_both_moment_strategies_are_exact_for_large_means(strategy, use_mask):
  # CPU lowers the two-pass strategy, GPU/TPU the shifted one-pass sums;
  # both are checked here on the CPU against float64.
  from jaxbn import stats
  rng = np.random.RandomState(6)
  x = (rng.randn(256, 4) + 1e4).astype(np.float32)
  w = (rng.rand(256, 1) > 0.3).astype(np.float32) if use_mask else None
  fn = {"two_pass": stats.local_moments,
        "shifted": stats.local_moments_shifted}[strategy]
  count, mean, m2 = fn(jnp.asarray(x), (0,), None if w is None
                       else jnp.asarray(w))
  ww = np.ones((256, 1)) if w is None else w.astype(np.float64)
  xx = x.astype(np.float64)
  mean_ref = (ww * xx).sum(0) / ww.sum()
  var_ref = (ww * (xx - mean_ref) ** 2).sum(0) / ww.sum()
  np.testing.assert_allclose(np.ravel(m2 / count), var_ref, rtol=1e-4)
  np.testing.assert_allclose(np.ravel(mean), mean_ref, atol=2e-3)


def test_forward_mode_works_with_fused_false_and_agrees_with_the_fast_path():
  x = jnp.asarray(np.random.RandomState(7).randn(6, 3), jnp.float32)
  fast = jaxbn.BatchNormConfig()
  plain = jaxbn.BatchNormConfig(fused=False)
  params, state = jaxbn.init(fast, x.shape)
  f = lambda c: (lambda x: jaxbn.apply(c, params, state, x, training=True)[0])
  np.testing.assert_allclose(jax.jacfwd(f(plain))(x), jax.jacrev(f(fast))(x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jacfwd(f(fast))(x)
