"""Mathematical properties of batch norm, over random shapes/axes/options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import jaxbn

# every property under both statistics algorithms (see conftest)
pytestmark = pytest.mark.usefixtures("statistics_mode")
# data of ordinary range (the extremes are test_statistics'): the overflow
# guard stays off here (conftest.py)
ORDINARY_DATA = True


@st.composite
def problems(draw, min_batch=2):
  ndim = draw(st.integers(2, 4))
  shape = [draw(st.integers(min_batch, 6))] + [draw(st.integers(1, 4))
                                              for _ in range(ndim - 1)]
  n_axes = draw(st.integers(1, ndim - 1))
  axes = sorted(draw(st.permutations(range(1, ndim)))[:n_axes])
  axis = axes[0] if n_axes == 1 else axes
  if draw(st.booleans()) and n_axes == 1:
    axis = axis - ndim
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.RandomState(seed)
  x = rng.randn(*shape) * rng.uniform(0.5, 5) + rng.uniform(-10, 10)
  return tuple(shape), axis, x.astype(np.float32), rng


# one compiled program per configuration and shape (eager dispatch would
# compile every operation for every new shape hypothesis draws)
_apply = jax.jit(jaxbn.apply, static_argnums=0, static_argnames=("training",))


def _channel_stats(y, config, shape):
  red = config.resolve(shape).reduction_axes
  return np.mean(y, axis=red), np.std(y, axis=red)


def _params(config, shape, rng):
  params, state = jaxbn.init(config, shape)
  params = {k: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)
            if k == "gamma" else jnp.asarray(rng.uniform(-1, 1, v.shape),
                                             jnp.float32)
            for k, v in params.items()}
  return params, state


@given(problems(min_batch=3), st.sampled_from([None, False]))
def test_output_mean_is_beta_and_std_is_gamma(problem, fused):
  shape, axis, x, rng = problem
  config = jaxbn.BatchNormConfig(axis=axis, epsilon=1e-6, fused=fused)
  if np.min(np.var(np.asarray(x, np.float64),
                   axis=config.resolve(shape).reduction_axes)) < 1e-3:
    return
  params, state = _params(config, shape, rng)
  y, _ = _apply(config, params, state, x, training=True)
  mean, std = _channel_stats(np.asarray(y, np.float64), config, shape)
  bshape = config.resolve(shape).broadcast_shape
  red = config.resolve(shape).reduction_axes
  beta = np.broadcast_to(np.reshape(params["beta"], bshape),
                         np.mean(y, axis=red, keepdims=True).shape)
  gamma = np.reshape(params["gamma"], bshape)
  np.testing.assert_allclose(mean, np.squeeze(beta, red), atol=2e-4)
  np.testing.assert_allclose(std, np.squeeze(np.broadcast_to(
      gamma, beta.shape), red), rtol=2e-3)


@given(problems(), st.floats(0.1, 10.0), st.floats(-100, 100))
def test_invariance_to_channel_shift_and_positive_scale(problem, a, b):
  shape, axis, x, rng = problem
  base = jaxbn.BatchNormConfig(axis=axis, epsilon=1e-3)
  # y(a x + b) with epsilon a^2 equals y(x) with epsilon exactly.
  scaled = jaxbn.BatchNormConfig(axis=axis, epsilon=1e-3 * a * a)
  params, state = _params(base, shape, rng)
  bshape = base.resolve(shape).broadcast_shape
  shift = rng.uniform(-1, 1, bshape) * b
  y1, _ = _apply(base, params, state, x, training=True)
  x2 = (np.asarray(x, np.float64) * a + shift).astype(np.float32)
  y2, _ = _apply(scaled, params, state, x2, training=True)
  tol = 1e-3 * max(1.0, abs(b) / a / 10)
  np.testing.assert_allclose(y1, y2, atol=tol, rtol=tol)


@given(problems())
def test_permuting_the_batch_permutes_the_output(problem):
  shape, axis, x, rng = problem
  config = jaxbn.BatchNormConfig(axis=axis)
  params, state = _params(config, shape, rng)
  perm = rng.permutation(shape[0])
  y, s1 = _apply(config, params, state, x, training=True)
  yp, s2 = _apply(config, params, state, x[perm], training=True)
  np.testing.assert_allclose(np.asarray(y)[perm], yp, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(s1["moving_variance"], s2["moving_variance"],
                             rtol=1e-5)


@given(problems(), st.integers(1, 3))
def test_contiguous_ghost_batches_equal_splitting_the_batch(problem, groups):
  shape, axis, x, rng = problem
  x = np.concatenate([x] * groups)
  x = x + rng.randn(*x.shape).astype(np.float32)
  vbs = shape[0]
  config = jaxbn.BatchNormConfig(axis=axis, virtual_batch_size=vbs,
                                 virtual_batch_layout="contiguous",
                                 momentum=0.0)
  plain = jaxbn.BatchNormConfig(axis=axis, momentum=0.0, fused=False)
  params, state = _params(config, shape, rng)
  y, s = _apply(config, params, state, x, training=True)
  parts = [_apply(plain, params, state, x[i * vbs:(i + 1) * vbs],
                       training=True) for i in range(groups)]
  np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]),
                             atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(
      s["moving_mean"], np.mean([p[1]["moving_mean"] for p in parts], 0),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      s["moving_variance"],
      np.mean([p[1]["moving_variance"] for p in parts], 0), rtol=1e-4)


@given(problems(min_batch=3), st.sampled_from([None, False]))
def test_masked_rows_equal_dropping_them(problem, fused):
  shape, axis, x, rng = problem
  keep = rng.rand(shape[0]) > 0.4
  keep[0] = True
  config = jaxbn.BatchNormConfig(axis=axis, fused=fused, momentum=0.5)
  params, state = _params(config, shape, rng)
  mask = keep.reshape((-1,) + (1,) * (len(shape) - 1))
  y, s = _apply(config, params, state, x, training=True, mask=mask)
  y_kept, s_kept = _apply(
      jaxbn.BatchNormConfig(axis=axis, momentum=0.5,
                            moving_variance_estimator="biased"),
      params, state, x[keep], training=True)
  np.testing.assert_allclose(np.asarray(y)[keep], y_kept, atol=3e-5,
                             rtol=3e-5)
  if not config.resolve(shape).keras_fused:
    np.testing.assert_allclose(s["moving_variance"], s_kept["moving_variance"],
                               rtol=1e-5)


@given(problems(), st.booleans(), st.booleans())
def test_fused_path_equals_general_path(problem, center, scale):
  shape, axis, x, rng = problem
  a = jaxbn.BatchNormConfig(axis=axis, center=center, scale=scale)
  b = jaxbn.BatchNormConfig(axis=axis, center=center, scale=scale,
                            fused=False, moving_variance_estimator=(
                                "unbiased" if a.resolve(shape).keras_fused
                                else "biased"))
  params, state = _params(a, shape, rng)
  ya, sa = _apply(a, params, state, x, training=True)
  yb, sb = _apply(b, params, state, x, training=True)
  np.testing.assert_allclose(ya, yb, atol=2e-5, rtol=2e-5)
  for k in sa:  # a mean near 0 next to large ones: absolute to their scale
    scale = float(np.max(np.abs(sb[k]), initial=1.0))
    np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6 * scale)
