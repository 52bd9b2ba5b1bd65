"""Batch statistics against float64 on data that defeats naive algorithms:
an outlier where the shifted sums used to take their shift, large means,
bfloat16, masks, and across devices; on every path (CPU kernels, XLA two
passes, the GPU/TPU one-read algorithm)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, strategies as st
from jax.sharding import Mesh, PartitionSpec as P

import jaxbn
from jaxbn import cpu_kernels, modes, passes, stats


def _outlier(value, rows):
  def make(rng):
    x = rng.normal(0, 1, (rows, 4))
    x[0] = value  # the first row: where a first-element shift is taken
    return x
  return make


CASES = {
    "outlier 1000 over 1e6 rows": (_outlier(1000.0, 1_000_000), "float32",
                                   1e-4),
    "outlier 300 over 1e5 rows": (_outlier(300.0, 100_000), "float32", 1e-4),
    "mean 1e4, std 1": (lambda rng: rng.normal(1e4, 1, (100_000, 4)),
                        "float32", 1e-4),
    "mean 1e6, std 1": (lambda rng: rng.normal(1e6, 1, (100_000, 4)),
                        "float32", 1e-4),
    "bfloat16 mean 100": (lambda rng: rng.normal(100, 1, (100_000, 4)),
                          "bfloat16", 1e-3),
}
PATHS = ["kernels", "xla", "accelerator"]


def _path(path):
  if path == "accelerator":
    return modes.statistics("accelerator")
  return cpu_kernels.use("on" if path == "kernels" else "off")


def _reference(x, mask):
  x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  w = np.ones((x64.shape[0], 1)) if mask is None else mask.astype(np.float64)
  mean = (w * x64).sum(0) / w.sum(0)
  return mean, (w * (x64 - mean) ** 2).sum(0) / w.sum(0)


# The numerics of non-finite, saturated and extreme data depend on how XLA
# fuses and vectorizes min/max and reductions: the tests marked
# default_compile run at the compile settings users run, in the subprocess
# below, and only there (the suite compiles faster, see conftest).


@pytest.mark.long
def test_extremes_hold_at_the_default_compile_settings():
  import os
  import subprocess
  import sys
  from tests.conftest import default_compile_env
  if os.environ.get("JAXBN_TEST_COMPILE") == "default":
    pytest.skip("this process already compiles at the default settings")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", __file__,
       "-m", "default_compile"],
      capture_output=True, text=True, timeout=600, env=default_compile_env(),
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert " passed" in result.stdout and "failed" not in result.stdout
  assert "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_batch_variance_is_accurate(case, path, masked):
  make, dtype, tolerance = CASES[case]
  rng = np.random.default_rng(0)
  x = jnp.asarray(make(rng), dtype)
  mask = rng.random((x.shape[0], 1)) > 0.3 if masked else None
  if masked:
    mask[0] = True  # keep the outlier
  with _path(path):
    count, mean, m2 = jax.jit(passes.moments, static_argnums=1)(
        x, (0,), None if mask is None else jnp.asarray(mask))
  want_mean, want_var = _reference(x, mask)
  var = np.ravel(m2 / count)
  np.testing.assert_array_less(np.abs(var - want_var) / want_var, tolerance)
  ulps = 4 * np.spacing(np.abs(want_mean).astype(np.float32)).max()
  np.testing.assert_allclose(np.ravel(mean), want_mean,
                             atol=tolerance * np.sqrt(want_var).max() + ulps)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale,offset", [(3e11, 1e12), (1e12, 0.0),
                                          (2e12, -5e12)])
def test_one_read_statistics_either_side_of_the_clamp(scale, offset, masked):
  # the one read's sums clamp x - s at 2^40 (about 1.1e12, stats.scaled_sums):
  # a channel with nothing clamped takes the clamped sums, one with some
  # values clamped (a quarter to a half of them here) the sums in units of
  # 2^96; either way within 1e-5 of float64
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(offset, scale, (257, 6)), jnp.float32)
  mask = rng.random((257, 1)) > 0.3 if masked else None
  with modes.statistics("accelerator"):
    got = jax.jit(lambda x, w: stats.moments(x, (0,), weights=w))(
        x, None if mask is None else jnp.asarray(mask, jnp.float32))
  want_mean, want_var = _reference(x, mask)
  np.testing.assert_allclose(np.ravel(got.variance), want_var, rtol=1e-5)
  np.testing.assert_allclose(np.ravel(got.mean), want_mean, rtol=0,
                             atol=1e-5 * np.sqrt(want_var).max())


@pytest.mark.parametrize("path", PATHS)
def test_across_devices_too(path):
  # 8 devices, uneven masks, the outlier on the first device's first row
  rng = np.random.default_rng(1)
  x = rng.normal(1e4, 1, (8 * 4096, 3))
  x[0] = 1e4 + 300
  mask = rng.random((x.shape[0], 1)) > 0.2
  mask[0] = True
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  f = jax.jit(jax.shard_map(
      lambda x, w: tuple(stats.merge_across_devices(
          *passes.moments(x, (0,), w), "data")),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
  with _path(path):
    count, mean, m2, _ = f(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
  want_mean, want_var = _reference(jnp.asarray(x, jnp.float32), mask)
  np.testing.assert_array_less(np.abs(np.ravel(m2 / count) - want_var)
                               / want_var, 1e-4)


def test_the_shift_is_a_robust_data_value():
  x = np.zeros((1000, 2), np.float32)
  x[:, 1] = np.arange(1000)
  x[0] = [1e30, np.nan]  # an outlier and a NaN among the samples
  shift = stats.sampled_shift(jnp.asarray(x), (0,))
  assert shift.shape == (1, 2)
  assert float(shift[0, 0]) == 0.0
  assert 400 <= float(shift[0, 1]) <= 600
  # masked-out samples do not count; no valid sample gives 0
  mask = np.zeros((1000, 1), bool)
  mask[500:] = True
  shift = stats.sampled_shift(jnp.asarray(x), (0,), jnp.asarray(mask))
  assert float(shift[0, 1]) >= 500
  assert np.all(np.asarray(stats.sampled_shift(
      jnp.asarray(x), (0,), jnp.zeros((1000, 1)))) == 0)


def _outlier_rows(rows, placement, rng):
  """16 row indices of ``rows``: on a sampling grid of k rows (the positions
  ``st // 2 :: st``, st = rows // k), at the evenly spread valid rows of a
  mask keeping every other row, in blocks, or at random."""
  grid = lambda k, n=rows: (n // k // 2 + (n // k) * np.arange(16)) % n
  return {"grid 16": grid(16), "grid 32": grid(32),
          "grid 33": grid(stats.ONE_READ_SHIFT_ROWS), "grid 64": grid(64),
          "grid 33 of the mask's valid rows": 2 * (
              (2 * np.arange(16) + 1) * (rows // 2)
              // (2 * stats.ONE_READ_SHIFT_ROWS)),
          "first": np.arange(16), "last": rows - 1 - np.arange(16),
          "middle": rows // 2 + np.arange(16),
          "random": rng.choice(rows, 16, replace=False)}[placement]


@pytest.mark.parametrize("layout", ["rows", "images"])
def test_one_read_statistics_survive_16_outlier_rows_anywhere(layout):
  # the one-read (GPU/TPU) statistics lose (mean - shift)^2 / var ulps: a
  # shift taken from one of 16 rows of 1000 among 2^18 rows of N(0, 1)
  # loses 1e-3 of the variance; no placement may reach the shift (the
  # layer's statistics, and the shifted sums of platform_moments)
  rows = 2 ** 18
  rng = np.random.default_rng(0)
  shape = (rows, 2) if layout == "rows" else (rows // 64, 8, 8, 2)
  axes = tuple(range(len(shape) - 1))
  clean = rng.standard_normal(shape).astype(np.float32)
  every_other = np.zeros((shape[0],) + (1,) * (len(shape) - 1), bool)
  every_other[::2] = True
  config = jaxbn.BatchNormConfig(momentum=0.0,
                                 moving_variance_estimator="biased")
  params, state = jaxbn.init(config, shape)
  layer = jax.jit(lambda x, w: jaxbn.apply(config, params, state, x,
                                           training=True, mask=w)[1])
  shifted = jax.jit(lambda x, w: stats.platform_moments(x, axes, w))
  with modes.statistics("accelerator"):
    for placement in ["grid 16", "grid 32", "grid 33", "grid 64",
                      "grid 33 of the mask's valid rows", "first", "last",
                      "middle", "random"]:
      x = clean.copy()
      x[_outlier_rows(shape[0], placement, rng)] = 1000.0
      for w in (np.ones_like(every_other), every_other):
        data = x[w.ravel()].astype(np.float64).reshape(-1, 2)
        count, _, m2 = shifted(x, w.astype(np.float32))
        for got in (layer(x, w)["moving_variance"], np.ravel(m2 / count)):
          np.testing.assert_allclose(
              got, data.var(0), rtol=1e-4,
              err_msg=f"{placement}, every other row: {not w.all()}")


_ROWS = 2 ** 18


@st.composite
def _outlier_placements(draw):
  """Up to 16 rows of ``_ROWS``: on a sampling grid of some k (any start),
  in a block, or anywhere."""
  count = draw(st.integers(1, 16))
  kind = draw(st.sampled_from(["grid", "block", "anywhere"]))
  if kind == "grid":
    k = draw(st.sampled_from([16, 32, 33, 64, 128]))
    stride = _ROWS // k
    # the grid's own positions (stride // 2 :: stride), or shifted
    start = draw(st.one_of(st.just(stride // 2), st.integers(0, stride - 1)))
    first = draw(st.integers(0, k - count))
    return start + stride * np.arange(first, first + count)
  if kind == "block":
    return draw(st.integers(0, _ROWS - count)) + np.arange(count)
  return np.asarray(draw(st.lists(st.integers(0, _ROWS - 1), min_size=count,
                                  max_size=count, unique=True)))


@functools.lru_cache(maxsize=None)
def _one_read_variance():
  config = jaxbn.BatchNormConfig(momentum=0.0,
                                 moving_variance_estimator="biased")
  params, state = jaxbn.init(config, (1, 2))
  return jax.jit(lambda x: jaxbn.apply(config, params, state, x,
                                       training=True)[1]["moving_variance"])


def _grid(k, count=16):
  return _ROWS // k // 2 + (_ROWS // k) * np.arange(count)


@given(rows=_outlier_placements(), value=st.sampled_from([1e3, -1e4, 3e5]))
@example(rows=_grid(16), value=1e3)  # every sample of a 16-sample grid
@example(rows=_grid(stats.ONE_READ_SHIFT_ROWS), value=-1e4)
@example(rows=_grid(32), value=3e5)
def test_no_outlier_rows_reach_the_one_read_shift(rows, value):
  clean = np.random.default_rng(1).standard_normal((_ROWS, 2))
  x = clean.astype(np.float32)
  x[rows] = value
  with modes.statistics("accelerator"):
    got = _one_read_variance()(x)
  np.testing.assert_allclose(got, x.astype(np.float64).var(0), rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_the_shift_is_the_lower_median_of_the_valid_samples(seed):
  # against NumPy's sort, with ties (few distinct values) and invalid (NaN)
  # samples, up to every sample of a column; and chosen without a sort
  rng = np.random.default_rng(seed)
  k = stats.SHIFT_SAMPLES
  sample = rng.integers(-3, 4, (k, 40)).astype(np.float32)
  sample[rng.random(sample.shape) < 0.3] = np.nan
  sample[:, 0] = np.nan
  sample[:, 1] = 5.0
  got = np.asarray(jax.jit(stats._lower_median)(jnp.asarray(sample)))
  for c in range(sample.shape[1]):
    valid = np.sort(sample[:, c][~np.isnan(sample[:, c])])
    want = valid[(len(valid) - 1) // 2] if len(valid) else 0.0
    assert got[c] == want, c
  hlo = jax.jit(lambda x: stats.sampled_shift(x, (0,))).lower(
      jnp.ones((1000, 2048))).as_text()
  assert "sort" not in hlo


def test_layer_statistics_under_the_accelerator_switch_use_no_kernel():
  config = jaxbn.BatchNormConfig()
  x = jnp.ones((16, 4, 4, 8))
  params, state = jaxbn.init(config, x.shape)
  f = lambda p, x: jaxbn.apply(config, p, state, x, training=True)[0]
  step = jax.jit(lambda p, x: jax.vjp(f, p, x)[1](x))
  with cpu_kernels.use("on"):
    assert "jaxbn_" in step.lower(params, x).as_text()
    with modes.statistics("accelerator"):
      assert "jaxbn_" not in step.lower(params, x).as_text()


# ------------------------------------------------ every path at the extremes

EXTREME_PATHS = ["kernels", "xla", "accelerator", "masked", "ghost",
                 "devices"]


@functools.lru_cache(maxsize=None)
def _step_on_path(path, config):
  """A jitted training step ``(params, state, x) -> (y, new_state)``."""
  if path == "devices":
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    return jax.jit(jax.shard_map(
        lambda params, state, x: jaxbn.apply(config, params, state, x,
                                             training=True, axis_name="data"),
        mesh=mesh, in_specs=(P(), P(), P("data")),
        out_specs=(P("data"), P())))
  return jax.jit(lambda params, state, x: jaxbn.apply(
      config, params, state, x, training=True,
      mask=(jnp.ones((x.shape[0], 1), bool) if path == "masked" else None)))


def _layer_on_path(path, config_args, x):
  """``(y, new_state)`` of one training step on ``path``."""
  config = jaxbn.BatchNormConfig(
      momentum=0.5, **config_args,
      **({"virtual_batch_size": x.shape[0]} if path == "ghost" else {}))
  params, state = jaxbn.init(config, x.shape)
  params = {"gamma": params["gamma"] * 2, "beta": params["beta"] + 0.25}
  mode = {"masked": "kernels", "ghost": "kernels", "devices": "kernels"}
  with _path(mode.get(path, path)):
    return _step_on_path(path, config)(params, state, x)


@pytest.mark.parametrize("epsilon", [1e-3, 0.0])
@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1.0, 5e15, 1e30, 3e38])
def test_constant_channels_normalize_to_beta_on_every_path(magnitude,
                                                           epsilon):
  rng = np.random.default_rng(2)
  x = rng.normal(0, 1, (64, 3)).astype(np.float32)
  x[:, 1] = magnitude
  x[:, 2] = -magnitude
  for path in EXTREME_PATHS:
    y, state = _layer_on_path(path, {"epsilon": epsilon}, jnp.asarray(x))
    y = np.asarray(y)
    np.testing.assert_array_equal(y[:, 1:], 0.25, err_msg=path)
    for name, value in state.items():
      assert np.all(np.isfinite(value)), (path, name)
    np.testing.assert_allclose(state["moving_mean"][1:],
                               np.float32(magnitude) * np.array([0.5, -0.5]),
                               rtol=1e-6, err_msg=path)


@pytest.mark.default_compile
@pytest.mark.parametrize("path", PATHS)
def test_non_finite_padding_of_a_sequence_mask_stays_out(path):
  # a (batch, time) mask over (batch, time, channels) weighs each element:
  # XLA:CPU takes its sums as products (0 * NaN = NaN), then takes the
  # channels they spoil again with the select; the statistics, the valid
  # outputs and the gradients are those of the valid positions alone
  rng = np.random.default_rng(11)
  shape = (6, 5, 4)
  x = rng.normal(3, 2, shape).astype(np.float32)
  r = rng.normal(0, 1, shape).astype(np.float32)
  keep = rng.random(shape[:2]) > 0.4
  keep[0, 0] = True
  poisoned = np.where(keep[..., None], x, np.nan).astype(np.float32)
  poisoned[np.argwhere(~keep)[0][0], np.argwhere(~keep)[0][1]] = np.inf
  config = jaxbn.BatchNormConfig(momentum=0.5)
  params, state = jaxbn.init(config, shape)

  def loss(params, x, r, m):
    y, new_state = jaxbn.apply(config, params, state, x, training=True,
                               mask=m)
    valid = np.ones(y.shape[:-1], bool) if m is None else m
    return jnp.sum(jnp.where(valid[..., None], y * r, 0)), (y, new_state)

  step = jax.jit(jax.grad(loss, has_aux=True))
  with _path(path):
    grads, (y, new_state) = step(params, jnp.asarray(poisoned),
                                 jnp.asarray(r), jnp.asarray(keep))
    grads_ref, (y_ref, state_ref) = step(params, jnp.asarray(x[keep]),
                                         jnp.asarray(r[keep]), None)
  for name in new_state:
    np.testing.assert_allclose(new_state[name], state_ref[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(y)[keep], y_ref, rtol=1e-5, atol=1e-5)
  for name in grads:
    np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-4,
                               atol=1e-5, err_msg=name)


@pytest.mark.default_compile
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_value_spoils_its_channel_alone_alike_on_every_path(bad):
  rng = np.random.default_rng(3)
  x = rng.normal(5, 2, (64, 3)).astype(np.float32)
  x[17, 0] = bad
  reference = {}
  for path in EXTREME_PATHS:
    y, state = _layer_on_path(path, {}, jnp.asarray(x))
    y = np.asarray(y)
    assert not np.any(np.isfinite(y[:, 0])), path  # the spoiled channel
    assert not np.isfinite(state["moving_variance"][0]), path
    reference.setdefault("y", y[:, 1:])
    reference.setdefault("state", {k: np.asarray(v)[1:]
                                   for k, v in state.items()})
    np.testing.assert_allclose(y[:, 1:], reference["y"], rtol=1e-5,
                               atol=1e-5, err_msg=path)
    for name, value in state.items():
      np.testing.assert_allclose(np.asarray(value)[1:],
                                 reference["state"][name], rtol=1e-5,
                                 err_msg=(path, name))


@pytest.mark.default_compile
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config_args", [{}, {"virtual_batch_size": 8},
                                         {"fused": False}])
def test_renorm_beyond_a_saturated_variance_uses_the_true_spread(path,
                                                                 config_args):
  # Fresh renorm state (renorm_mean 0, renorm_stddev 1), no clipping, so
  # r = s / 1 and d = mean / 1 with s = sqrt(var + epsilon) of the batch's
  # (over virtual batches: mean) variance, and y = (x - m_g) / s_g * s + mean
  # (y = x without virtual batches). At 1e30 the variance (1e60) saturates
  # in float32, s does not: r, renorm_stddev and moving_stddev come from it.
  rng = np.random.default_rng(5)
  x = rng.standard_normal((64, 3)) * np.array([1.0, 1e30, 3e25])
  x = x.astype(np.float32)
  config = jaxbn.BatchNormConfig(renorm=True, momentum=0.0,
                                 renorm_momentum=0.0, **config_args)
  params, state = jaxbn.init(config, x.shape)
  with _path(path):
    y, new_state = jax.jit(lambda x: jaxbn.apply(
        config, params, state, x, training=True))(x)
  # strided virtual batches: batch g holds rows g, g + 8, ...
  x64 = x.astype(np.float64)
  groups = (x64.reshape(8, 8, 3).transpose(1, 0, 2)
            if "virtual_batch_size" in config_args else x64[None])
  m_g, v_g = groups.mean(1, keepdims=True), groups.var(1, keepdims=True)
  s = np.sqrt(v_g.mean(0) + 1e-3)
  want = (groups - m_g) / np.sqrt(v_g + 1e-3) * s + m_g.mean(0)
  want = want.transpose(1, 0, 2).reshape(64, 3) if len(groups) > 1 else want[0]
  error = np.abs(np.asarray(y, np.float64) - want).max(0)
  assert np.all(error <= 1e-4 * np.abs(want).max(0)), error
  # renorm disables Keras' fused kernel: no Bessel correction
  for name in ("renorm_stddev", "moving_stddev"):
    np.testing.assert_allclose(new_state[name], np.ravel(s), rtol=1e-4,
                               err_msg=name)
  assert np.isfinite(new_state["moving_variance"]).all()


# Wide enough (groups x channels beyond about 4096) that XLA:CPU fuses the
# M2 clamp into the reduction, where a max would map NaN to 0.
@pytest.mark.default_compile
@pytest.mark.parametrize("shape, config_args", [
    ((12, 3, 3, 768), {"virtual_batch_size": 3}),
    ((6, 5120), {}),
    ((12, 3, 3, 768), {"virtual_batch_size": 3, "fused": False}),
    ((6, 5120), {"renorm": True, "renorm_clipping": {"rmax": 3.0,
                                                      "dmax": 5.0}}),
])
@pytest.mark.parametrize("path", ["kernels", "xla", "accelerator"])
def test_no_fused_clamp_loses_a_nan_or_an_overflow(shape, config_args, path):
  rng = np.random.default_rng(11)
  clean = rng.normal(0.5, 3, shape).astype(np.float32)
  x = clean.copy()
  x[..., 1] *= 2.0 ** 98  # squares overflow: taken in units, not a constant
  x[2, ..., 2] = np.nan
  x[4, ..., 3] = -np.inf
  config = jaxbn.BatchNormConfig(**config_args)
  params, state = jaxbn.init(config, shape)
  step = jax.jit(lambda p, s, x: jaxbn.apply(config, p, s, x, training=True))
  with _path(path):
    y, new_state = step(params, state, jnp.asarray(x))
  # batch norm is invariant to scaling a channel by a power of two (epsilon
  # aside, negligible here): channel 1 must come out as the clean data's
  with _path("kernels"):
    expected, _ = step(params, state, jnp.asarray(clean))
  y = np.asarray(y).reshape(-1, shape[-1])
  expected = np.asarray(expected).reshape(-1, shape[-1])
  # renorm's first r, d compare the batch with averages in plain units: the
  # spread channel's differ from the clean one's (finite all the same)
  finite = np.r_[0, 4:shape[-1]] if "renorm" in config_args else np.r_[
      0, 1, 4:shape[-1]]
  np.testing.assert_allclose(y[:, finite], expected[:, finite], rtol=1e-4,
                             atol=1e-4)
  assert np.all(np.isfinite(y[:, 1]))
  for channel in (2, 3):  # spoiled: in the ghost batch holding the value
    spoiled = np.isfinite(y[:, channel])
    assert (not np.all(spoiled) if "virtual_batch_size" in config_args
            else not np.any(spoiled)), channel
    for name in ("moving_variance", "moving_mean"):
      value = np.asarray(new_state[name]).reshape(-1)[channel]
      assert not np.isfinite(value), (name, channel)


_BAD = (np.nan, np.inf, -np.inf)
_channel = st.one_of(
    # data: mean up to 1e37, spread 1e-15 to 1e38 (beyond 2^30 the overflow
    # guard takes the statistics in units; a variance beyond float32's range
    # saturates in the state; below about 1e-18 it underflows: README)
    st.tuples(st.just("data"), st.floats(-1e37, 1e37),
              st.floats(1e-15, 1e38), st.just(False)),
    st.tuples(st.just("constant"), st.floats(-3.4e38, 3.4e38), st.just(0.0),
              st.just(False)),
    # a NaN/Inf at a random row, or on the shift's sampling grids (row 2)
    st.tuples(st.just("non-finite"), st.sampled_from(_BAD), st.just(0.0),
              st.booleans()))


@given(channels=st.lists(_channel, min_size=4, max_size=4),
       epsilon=st.sampled_from([1e-3, 0.0]), seed=st.integers(0, 2 ** 16),
       wide=st.booleans())
@example(channels=[("data", 0.0, 1e30, False),
                   ("non-finite", np.nan, 0.0, True),
                   ("data", 1e6, 1.0, False),
                   ("non-finite", np.inf, 0.0, False)],
         epsilon=1e-3, seed=0, wide=True)
def test_every_path_agrees_at_the_extremes(channels, epsilon, seed, wide):
  # One batch, every path (kernels, XLA, GPU/TPU statistics, masked, ghost,
  # 8 devices), against float64 over the same float32 values; wide: each
  # channel 1024 times (4096 channels, where XLA:CPU fuses a clamp into its
  # reduction and a max there would map NaN to 0).
  rng = np.random.default_rng(seed)
  x = np.empty((64, 4), np.float32)
  for c, (kind, location, spread, sampled) in enumerate(channels):
    if kind == "data":
      x[:, c] = location + spread * rng.normal(size=64)
    elif kind == "constant":
      x[:, c] = location
    else:
      x[:, c] = rng.normal(size=64)
      x[2 if sampled else rng.integers(64), c] = location
  if wide:
    x = np.repeat(x, 1024, axis=1)
  finite = np.all(np.isfinite(x), axis=0)
  xd = x.astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean, var = xd.mean(0), xd.var(0)
    inv = np.where(var + epsilon > 0, 1 / np.sqrt(var + epsilon), 0.0)
    y_ref = (xd - mean) * inv * 2 + 0.25
    # a float32 mean is off by up to half an ulp of itself, which moves
    # (x - mean) * inv by that much relative to the spread
    y_tolerance = 1e-3 + 2 * 2.0 ** -23 * np.abs(mean) * inv
  scale = np.max(np.abs(xd), axis=0, where=np.isfinite(xd), initial=0)
  # wide: the paths whose statistics XLA reduces (the kernels' clamps are
  # C++, which keeps a NaN)
  for path in ["xla", "accelerator", "devices"] if wide else EXTREME_PATHS:
    y, state = _layer_on_path(path, {"epsilon": epsilon}, jnp.asarray(x))
    y = np.asarray(y, np.float64)
    # finite channels: float64's answer, finite moving statistics
    error = np.abs(y - y_ref)[:, finite]
    assert np.all(error <= y_tolerance[finite] + 1e-3 * np.abs(
        y_ref[:, finite])), (path, error.max(0), y_tolerance)
    for name, value in state.items():
      assert np.all(np.isfinite(np.asarray(value)[finite])), (path, name)
    moving_mean = np.asarray(state["moving_mean"], np.float64)[finite]
    # (float32 flushes subnormal numbers to 0 on CPU)
    tolerance = np.maximum(1e-6 * scale[finite], np.finfo(np.float32).tiny)
    assert np.all(np.abs(moving_mean - 0.5 * mean[finite]) <= tolerance), (
        path, moving_mean, mean)
    # a non-finite value spoils its own channel only (checked above)
    assert not np.any(np.isfinite(y[:, ~finite])), path


# ----------------------------------- the overflow guard: spreads up to 3e38

_SPREADS = [(1e13, 0.0), (1e20, 3e20), (1e30, -2e30), (1e37, 5e37)]


def _float64_gradients(x, dy, gamma, epsilon=1e-3):
  """``(y, dx, dgamma, dbeta)`` of training batch norm in float64."""
  x, dy = x.astype(np.float64), dy.astype(np.float64)
  mean, var = x.mean(0), x.var(0)
  inv = 1 / np.sqrt(var + epsilon)
  x_hat = (x - mean) * inv
  dx = gamma * inv * (dy - dy.mean(0) - x_hat * (dy * x_hat).mean(0))
  return x_hat * gamma, dx, (dy * x_hat).sum(0), dy.sum(0)


def _gradients_and_grad_of_grad(config, dtype, mask=None):
  """jitted ``(x, dy, w) -> (dx, d/dx sum(dx * w))`` of ``sum(y * dy)``."""
  params = {"gamma": jnp.asarray([1.0, 2.0, 0.5, 1.5], dtype),
            "beta": jnp.zeros(4, dtype)}
  _, state = jaxbn.init(config, (1, 4), dtype=dtype)

  def dx(x, dy):
    return jax.grad(lambda x: jnp.sum(jaxbn.apply(
        config, params, state, x, training=True, mask=mask)[0] * dy))(x)

  return jax.jit(lambda x, dy, w: (dx(x, dy), jax.grad(
      lambda x: jnp.sum(dx(x, dy) * w))(x)))


@pytest.mark.parametrize("path", PATHS + ["masked"])
def test_backward_is_centred_on_the_mean(path):
  # dx = a dy + c (x - mean) + d: written as c x + (d - c mean), c x and
  # c mean cancel where |mean| >> std, an error of about eps |mean| / std
  # (at 3e7: dx 4e-2 off float64, grad of grad 1.8, a constant channel's
  # second derivative 1e3 where it is 0). Here the data are symmetric about
  # a float32 value, so that the mean itself is exact on every path and
  # only that cancellation could make an error.
  # masked: every row valid, through the masked kernels and passes
  mask = np.ones((256, 1), bool) if path == "masked" else None
  fast = _gradients_and_grad_of_grad(jaxbn.BatchNormConfig(), jnp.float32,
                                     mask)
  for mean in (3e7,):
    (x, dy, w), want = _large_mean_problem(mean)
    with _path("kernels" if path == "masked" else path):
      got = fast(x, dy, w)
    for name, g, e, rtol in zip(("dx", "grad of grad"), got, want,
                                (1e-5, 1e-4)):
      scale = np.abs(e[:, :3]).max()
      error = np.abs(np.asarray(g, np.float64) - e)[:, :3].max() / scale
      assert error <= rtol, (mean, name, error)
    assert np.all(np.asarray(got[1])[:, 3] == 0), mean


@functools.lru_cache(maxsize=None)
def _large_mean_problem(mean):
  """``((x, dy, w), float64 derivatives)``: 256 rows of ``mean`` plus even
  integers up to 16 in +/- pairs (exact in float32 up to 3e7, their mean
  exactly ``mean``), the last channel constant."""
  rng = np.random.default_rng(int(np.log10(mean)))
  z = 2.0 * rng.integers(-8, 9, size=(128, 4))
  x = (mean + np.concatenate([z, -z])).astype(np.float32)
  x[:, 3] = mean  # a constant channel: its second derivative is 0
  dy, w = (rng.normal(size=(256, 4)).astype(np.float32) for _ in range(2))
  with jax.enable_x64():
    exact = _gradients_and_grad_of_grad(jaxbn.BatchNormConfig(fused=False),
                                        jnp.float64)
    want = [np.asarray(v) for v in exact(*(jnp.asarray(v, jnp.float64)
                                           for v in (x, dy, w)))]
  return (x, dy, w), want


# README's accuracy table: these spreads, and one isolated outlier at 1e30
# (row 37: off the shift's sampling grid, so no sample sees it)
@pytest.mark.parametrize("spread,offset", _SPREADS + [("outlier", 1e30)])
def test_gradients_at_any_spread_match_float64_on_every_path(spread, offset):
  rng = np.random.default_rng(7)
  if spread == "outlier":
    x = rng.normal(size=(64, 3)).astype(np.float32)
    x[37, :2] = offset
  else:
    x = (offset + spread * rng.normal(size=(64, 3))).astype(np.float32)
  x[:, 2] = rng.normal(size=64)  # an ordinary channel beside them
  dy = rng.normal(size=(64, 3)).astype(np.float32)
  gamma = np.float32([2.0, 0.5, 1.5])
  y_ref, dx_ref, dgamma_ref, dbeta_ref = _float64_gradients(x, dy, gamma)
  config = jaxbn.BatchNormConfig(momentum=0.5)
  _, state = jaxbn.init(config, x.shape)
  params = {"gamma": jnp.asarray(gamma), "beta": jnp.zeros(3)}
  for path in ["kernels", "xla", "accelerator", "masked"]:
    mask = np.ones(64, bool) if path == "masked" else None

    def loss(params, x):
      y, new_state = jaxbn.apply(config, params, state, x, training=True,
                                 mask=mask)
      return jnp.sum(y * dy), (y, new_state)

    with _path("kernels" if path == "masked" else path):
      (_, (y, new_state)), (dparams, dx) = jax.jit(jax.value_and_grad(
          loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    np.testing.assert_allclose(y, y_ref, atol=2e-5, err_msg=path)
    # dx ~ 1/spread: float32 flushes what falls below its smallest normal
    scale = np.abs(dx_ref).max(0)
    assert np.all(np.abs(dx - dx_ref) <= 1e-5 * scale + 2 * np.finfo(
        np.float32).tiny / 1e-3 * (scale < 1e-30)), path
    np.testing.assert_allclose(dparams["gamma"], dgamma_ref, rtol=1e-4,
                               atol=1e-4, err_msg=path)
    np.testing.assert_allclose(dparams["beta"], dbeta_ref, rtol=1e-5,
                               atol=1e-5, err_msg=path)
    for name, value in new_state.items():
      assert np.all(np.isfinite(value)), (path, name)
    var64 = x.astype(np.float64).var(0)  # saturated, then averaged
    expected = 0.5 + 0.5 * np.minimum(var64, np.finfo(np.float32).max)
    np.testing.assert_allclose(new_state["moving_variance"], expected,
                               rtol=1e-5, err_msg=path)


@pytest.mark.parametrize("spread,offset", [(1.0, 0.0), _SPREADS[2]])
def test_wide_rows_in_the_output_kernel_match_float64(spread, offset):
  # 3080 channels: the forward's output pass is a CPU kernel there
  # (cpu_kernels.WIDE_ROW_CHANNELS), in units for the first two channels
  rng = np.random.default_rng(8)
  x = rng.normal(size=(16, 3080)).astype(np.float32)
  x[:, :2] = offset + spread * rng.normal(size=(16, 2))
  dy = rng.normal(size=x.shape).astype(np.float32)
  gamma = rng.uniform(0.5, 2.0, size=3080).astype(np.float32)
  y_ref, dx_ref, dgamma_ref, _ = _float64_gradients(x, dy, gamma)
  config = jaxbn.BatchNormConfig(momentum=0.5)
  _, state = jaxbn.init(config, x.shape)
  params = {"gamma": jnp.asarray(gamma), "beta": jnp.zeros(3080)}

  def loss(params, x):
    y, _ = jaxbn.apply(config, params, state, x, training=True)
    return jnp.sum(y * dy), y

  with _path("kernels"):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    assert cpu_kernels.available() == (
        "jaxbn_normalize" in step.lower(params, jnp.asarray(x)).as_text())
    (_, y), (dparams, dx) = step(params, jnp.asarray(x))
  np.testing.assert_allclose(y, y_ref, atol=3e-5)
  scale = np.abs(dx_ref).max(0)
  assert np.all(np.abs(dx - dx_ref) <= 1e-5 * scale)
  np.testing.assert_allclose(dparams["gamma"], dgamma_ref, rtol=1e-4,
                             atol=1e-4)


def test_the_guard_picks_its_branch_in_python_when_the_data_are_known():
  # Eagerly (eager grad included) the guard's predicate is known, so only
  # the branch it picks runs (an eager lax.cond would compile both on every
  # call); traced, it is a lax.cond. Both give the numbers of the jit.
  calls = []
  branch = lambda name: (lambda: calls.append(name) or jnp.float32(len(name)))
  assert stats.guard_cond(jnp.bool_(True), branch("yes"), branch("no")) == 3
  assert calls == ["yes"]
  jaxpr = jax.make_jaxpr(lambda p: stats.guard_cond(
      p, branch("yes"), branch("no")))(True)
  assert "cond[" in str(jaxpr)
  rng = np.random.default_rng(8)
  x = (rng.normal(size=(32, 2)) * np.float32([1e25, 1])).astype(np.float32)
  dy = rng.normal(size=(32, 2)).astype(np.float32)
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, x.shape)
  loss = lambda p, x: jnp.sum(jaxbn.apply(config, p, state, x,
                                          training=True)[0] * dy)
  grad = jax.grad(loss, argnums=(0, 1))
  for path in ["kernels", "xla"]:
    with _path(path):
      eager, jitted = grad(params, x), jax.jit(grad)(params, x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
  _, dx_ref, _, _ = _float64_gradients(x, dy, np.ones(2, np.float32))
  assert np.all(np.abs(eager[1] - dx_ref) <= 1e-5 * np.abs(dx_ref).max(0))


def test_under_vmap_the_guard_stays_a_cond_and_each_member_gets_its_numbers():
  # An ensemble (vmap over members): the guard's conds stay conds (a batched
  # predicate would run both branches for every member), and a member spread
  # beyond float32's squares gets the numbers it gets alone.
  rng = np.random.default_rng(9)
  xs = rng.normal(size=(3, 32, 2)).astype(np.float32)
  xs[1, :, 0] *= 1e25
  dys = rng.normal(size=(3, 32, 2)).astype(np.float32)
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, xs.shape[1:])

  def grads(x, dy):
    loss = lambda p, x: jnp.sum(jaxbn.apply(config, p, state, x,
                                            training=True)[0] * dy)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  for path in ["kernels", "xla"]:
    with _path(path):
      # the guard's cond (the tests trace CPU programs: no platform switch)
      conds = str(jax.make_jaxpr(grads)(xs[0], dys[0])).count("cond[")
      assert conds >= 1
      assert str(jax.make_jaxpr(jax.vmap(grads))(xs, dys)).count(
          "cond[") == conds
      together = jax.jit(jax.vmap(grads))(xs, dys)
      for member in range(3):
        alone = jax.jit(grads)(xs[member], dys[member])
        for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
          np.testing.assert_allclose(a[member], b, rtol=1e-5, atol=1e-6,
                                     err_msg=f"{path} {member}")
  _, dx_ref, _, _ = _float64_gradients(xs[1], dys[1], np.ones(2, np.float32))
  assert np.all(np.abs(together[1][1] - dx_ref)
                <= 1e-5 * np.abs(dx_ref).max(0))


def test_device_means_far_apart_merge_in_units():
  # each device's shard is constant (its own variance 0) but the means of
  # the 8 devices spread to 1e30: the merged variance needs units
  rng = np.random.default_rng(8)
  x = np.repeat(rng.normal(size=(8, 1, 2)) * 1e30, 8, axis=1).reshape(64, 2)
  x = x.astype(np.float32)
  y, state = _layer_on_path("devices", {}, jnp.asarray(x))
  xd = x.astype(np.float64)
  y_ref = (xd - xd.mean(0)) / xd.std(0) * 2 + 0.25
  np.testing.assert_allclose(y, y_ref, atol=1e-4)
  assert np.all(np.isfinite(state["moving_variance"]))
  np.testing.assert_allclose(state["moving_mean"], 0.5 * xd.mean(0),
                             rtol=1e-5)


def test_ordinary_data_get_the_same_numbers_with_and_without_the_guard():
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(3, 2, (64, 8, 8, 16)).astype(np.float32))
  config = jaxbn.BatchNormConfig(renorm=True, virtual_batch_size=16)
  params, state = jaxbn.init(config, x.shape)
  step = lambda p, x: jax.vjp(lambda p, x: jaxbn.apply(
      config, p, state, x, training=True), p, x)
  results = {}
  for guard in ["on", "off"]:
    with modes.overflow_guard(guard):
      lowered = jax.jit(step).lower(params, x)
      compiled = lowered.compile()
      (y, new_state), vjp = jax.jit(step)(params, x)
      results[guard] = (y, new_state, vjp((x, jax.tree.map(jnp.zeros_like,
                                                           new_state))))
    # the guard is a cond (the retake, the backward in units); none without
    assert ("conditional" in compiled.as_text()) == (guard == "on")
  for a, b in zip(jax.tree_util.tree_leaves(results["on"]),
                  jax.tree_util.tree_leaves(results["off"])):
    # to rounding: XLA may fuse the two programs differently
    scale = float(np.max(np.abs(b), initial=1.0))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)


def test_inverse_unit_is_a_power_of_two_above_the_magnitude():
  values = jnp.asarray([0.0, 1e-30, 0.75, 1.0, 3.0, 1e30, 3.4e38, np.inf,
                        np.nan], jnp.float32)
  inv = np.asarray(stats.inverse_unit(values), np.float64)
  mantissa, _ = np.frexp(inv)
  assert np.all(mantissa == 0.5)  # powers of two
  finite = np.isfinite(np.asarray(values)) & (np.asarray(values) != 0)
  # (within 2, and 4 at the top, where the unit stops at 2^126)
  assert np.all(np.abs(np.asarray(values, np.float64))[finite] * inv[finite]
                <= np.where(inv[finite] == 2.0 ** -126, 4, 2))
  assert np.all(inv[~finite] == 1)
  assert np.all(inv >= 2.0 ** -126)  # a normal number: never flushed


@pytest.mark.parametrize("shape,mask_shape", [((100_000, 4), (100_000, 1)),
                                              ((64, 9, 7, 4), (64, 9, 1, 1))])
def test_shift_comes_from_valid_rows_when_a_mask_hides_nearly_all(shape,
                                                                  mask_shape):
  # three valid positions, none on the strided grid: the GPU/TPU sums must
  # still shift by a data value (shift 0 loses (1e4 / 1e-2)^2 ulps)
  rng = np.random.default_rng(10)
  x = (1e4 + 1e-2 * rng.normal(size=shape)).astype(np.float32)
  mask = np.zeros(mask_shape, bool)
  flat = mask.reshape(-1)
  flat[[1, 2, 5]] = True
  weights = jnp.asarray(np.broadcast_to(mask, shape).astype(np.float32)
                        if mask_shape[-1] != 1 else mask.astype(np.float32))
  axes = tuple(range(len(shape) - 1))
  count, mean, m2 = jax.jit(lambda x, w: stats.local_moments_shifted(
      x, axes, w))(jnp.asarray(x), weights)
  valid = np.broadcast_to(mask, shape)
  xd = np.where(valid, x.astype(np.float64), np.nan).reshape(-1, shape[-1])
  want = np.nanvar(xd, axis=0) * valid.reshape(-1, shape[-1]).sum(0)
  np.testing.assert_allclose(np.asarray(m2).ravel(), want, rtol=1e-4)
  shift = stats.sampled_shift(jnp.asarray(x), axes, weights)
  assert np.all(np.abs(np.asarray(shift) - 1e4) < 1)
