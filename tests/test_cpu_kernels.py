"""The CPU kernels (jaxbn/csrc) against NumPy float64 and against XLA."""
import math
import re
import shutil

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import affine, cpu_kernels, modes, stats

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="CPU kernels not built")


def test_kernels_are_built_wherever_a_compiler_is():
  if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"):
    assert cpu_kernels.available(), (
        "a C++ compiler is installed but jaxbn._cpu_kernels was not built: "
        "reinstall with `pip install -e .` and read the build log")


def _as3(value, view):
  """``value`` as (A1 * A, G * C, B): reduced, kept, reduced axes."""
  return np.asarray(value).reshape(view.shape).transpose(0, 2, 1, 3, 4).reshape(
      view.a1 * view.a, view.channels, view.b)


def _from3(value, view, shape):
  """The inverse of ``_as3``."""
  return np.asarray(value).reshape(view.a1, view.a, view.g, view.c,
                                   view.b).transpose(0, 2, 1, 3, 4).reshape(shape)


def _reference_moments(x, view):
  x3 = _as3(np.asarray(x, np.float64), view)
  mean = x3.mean(axis=(0, 2)) if x3.size else np.zeros(view.channels)
  m2 = ((x3 - mean[None, :, None]) ** 2).sum(axis=(0, 2))
  return mean, m2


VIEWS = [
    ((64, 8, 8, 16), (0, 1, 2)),     # NHWC
    ((16, 24, 9, 9), (0, 2, 3)),     # NCHW
    ((300, 3), (0,)),                # (N, C), C not a multiple of 8
    ((7, 5, 17), (0, 1)),            # 17 channels
    ((40, 2050), (0,)),              # wide: 64-row blocks, a row per step
    ((527, 3076), (0,)),             # wider: 4 rows per step, 2 parts
    ((1003, 40), (0,)),              # 4 rows per step, rows left over
    ((70, 96), (0,)),                # 2 rows per step (moments)
    ((3, 2, 9000), (0, 2)),          # channel runs longer than a block
    ((1, 4, 3, 3), (0, 2, 3)),       # one example
    ((0, 6), (0,)),                  # empty batch
    ((5, 4, 3, 2), (0, 3)),          # two channel axes (1, 2)
    ((4, 3, 5, 5, 16), (0, 2, 3)),   # virtual batches, strided NHWC
    ((3, 4, 6, 9, 9), (1, 3, 4)),    # virtual batches, contiguous NCHW
    ((2, 5, 66, 3), (0, 2)),         # virtual batches, strided (N, T, C)
]


@needs_kernels
@pytest.mark.parametrize("shape,axes", VIEWS)
@pytest.mark.parametrize("center", [0.0, 1e4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moments_match_float64(shape, axes, center, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray((rng.normal(size=shape) * 2 + center).astype(np.float32),
                  dtype)
  view = cpu_kernels.channel_view(shape, axes)
  mean, m2 = jax.jit(cpu_kernels.moments, static_argnums=1)(x, view)
  assert mean.dtype == m2.dtype == jnp.float32
  # the reference sees the same (bf16-rounded) values, in float64
  want_mean, want_m2 = _reference_moments(np.asarray(x, np.float32), view)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(m2, want_m2, rtol=2e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("shape,axes", VIEWS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_sums_match_float64(shape, axes, dtype):
  rng = np.random.default_rng(1)
  x = (rng.normal(size=shape) + 3).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)
  if dtype == "bfloat16":  # the reference sees the bf16-rounded values
    x, dy = (np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
             for v in (x, dy))
  view = cpu_kernels.channel_view(shape, axes)
  mean = _reference_moments(x, view)[0].astype(np.float32)
  sum_dy, sum_dy_xc = jax.jit(cpu_kernels.grad_sums, static_argnums=3)(
      jnp.asarray(dy, dtype), jnp.asarray(x, dtype), mean, view)
  x3 = _as3(np.asarray(x, np.float64), view)
  dy3 = _as3(np.asarray(dy, np.float64), view)
  scale = np.abs(dy3).sum(axis=(0, 2)) * (1 + np.abs(x3).max(initial=0))
  np.testing.assert_allclose(sum_dy, dy3.sum(axis=(0, 2)),
                             atol=1e-6 * scale.max(initial=1) + 1e-6)
  want = (dy3 * (x3 - mean[None, :, None])).sum(axis=(0, 2))
  np.testing.assert_allclose(sum_dy_xc, want,
                             atol=1e-6 * scale.max(initial=1) + 1e-6)


def _input_grad_inputs(shape, axes, dtype, seed=4):
  rng = np.random.default_rng(seed)
  view = cpu_kernels.channel_view(shape, axes)
  dy = jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype)
  x = jnp.asarray((rng.normal(size=shape) + 3).astype(np.float32), dtype)
  coefficients = rng.normal(size=(4, view.channels)).astype(np.float32)
  coefficients[3] += 3  # the mean x is centred on
  return dy, x, coefficients, view


def _reference_input_grad(dy, x, coefficients, view):
  a, c, d, m = (np.asarray(v, np.float64)[None, :, None]
                for v in coefficients)
  dy3, x3 = (_as3(np.asarray(v, np.float64), view) for v in (dy, x))
  return _from3(a * dy3 + c * (x3 - m) + d, view, np.shape(x))


@needs_kernels
@pytest.mark.parametrize("shape,axes", VIEWS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stream", [False, True])
def test_input_gradient_matches_float64(shape, axes, dtype, stream):
  dy, x, coefficients, view = _input_grad_inputs(shape, axes, dtype)
  dx = jax.jit(cpu_kernels.input_grad, static_argnums=(3, 4))(
      dy, x, coefficients, view, stream)
  assert dx.shape == x.shape and dx.dtype == x.dtype
  want = _reference_input_grad(dy, x, coefficients, view)
  if dtype == "float32":
    np.testing.assert_allclose(dx, want, rtol=1e-6, atol=1e-5)
  else:  # one rounding to bfloat16 (half an ulp) plus float32 arithmetic
    np.testing.assert_allclose(np.asarray(dx, np.float32), want,
                               rtol=2 ** -8 + 1e-6, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_stores_write_the_same_bits(dtype):
  # Large enough to stream by default, with 17 channels so that rows start
  # at every alignment (unaligned rows take plain stores), NCHW runs, and
  # wide rows (four at a time; 203 rows leave three over).
  for shape, axes in [((8192, 17), (0,)), ((8, 16, 96, 100), (0, 2, 3)),
                      ((203, 3080), (0,))]:
    dy, x, coefficients, view = _input_grad_inputs(shape, axes, dtype)
    plain = cpu_kernels.input_grad(dy, x, coefficients, view, stream=False)
    streamed = cpu_kernels.input_grad(dy, x, coefficients, view, stream=True)
    np.testing.assert_array_equal(np.asarray(plain, np.float32),
                                  np.asarray(streamed, np.float32))
  threshold = cpu_kernels.streaming_threshold_bytes()
  assert 1 << 20 <= threshold <= cpu_kernels.last_level_cache_bytes()


def _output_pass_inputs(shape, axes, dtype, seed=6):
  """x with specials, per-channel u (powers of two), mean, a, b (keepdims)."""
  rng = np.random.default_rng(seed)
  view = cpu_kernels.channel_view(shape, axes)
  kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
  x = rng.normal(size=shape).astype(np.float32) * 4 + 1
  x.flat[:7] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38, -3e38]
  u = (2.0 ** rng.integers(-3, 1, size=kept)).astype(np.float32)
  mean, a, b = (rng.normal(size=kept).astype(np.float32) for _ in range(3))
  return jnp.asarray(x, dtype), u, mean, a, b, view


OUTPUT_VIEWS = [
    ((203, 3080), (0,)),             # wide rows, four a step, three left over
    ((3, 5, 3077), (0, 1)),          # rows not a multiple of 8 channels
    ((4, 6, 3, 50), (0, 2, 3)),      # channel runs (NCHW)
]


@needs_kernels
@pytest.mark.parametrize("shape,axes", OUTPUT_VIEWS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("relu,stream", [(False, True), (True, False)])
def test_output_pass_matches_float64(shape, axes, dtype, relu, stream):
  x, u, mean, a, b, view = _output_pass_inputs(shape, axes, dtype)
  terms = jnp.stack([jnp.asarray(v).reshape(view.channels)
                     for v in (u, mean * u, a, b)])
  y = jax.jit(cpu_kernels.normalize, static_argnums=(1, 3, 4))(
      x, view, terms, relu, stream)
  assert y.shape == x.shape and y.dtype == x.dtype
  x64 = np.asarray(x, np.float64)
  want = (x64 * u - mean * u) * a + b
  if relu:
    want = np.where(np.isnan(want), want, np.maximum(want, 0))
  got = np.asarray(y, np.float64)
  finite = np.isfinite(want) & (np.abs(want) < 1e38)
  # float32 steps: x u - m, (.) a and + b each round once (bfloat16 once more)
  scale = (np.abs(x64 * u) + np.abs(mean * u)) * np.abs(a) + np.abs(b)
  rtol = 2 ** -7 if dtype == "bfloat16" else 1e-6

  def assert_close(value, reference):
    with np.errstate(invalid="ignore"):  # inf - inf where both overflowed
      error = np.abs(value - reference)
    np.testing.assert_array_less(error[finite], (rtol * scale + 1e-30)[finite])
    np.testing.assert_array_equal(np.isnan(value), np.isnan(reference))

  assert_close(got, want)
  if relu:
    assert (got[~np.isnan(got)] >= 0).all()
  if dtype == "float32":  # each step rounded once: the backward's gate's z
    with np.errstate(invalid="ignore", over="ignore"):
      z = (np.asarray(x) * u - mean * u) * a + b
    z = np.where(z <= 0, np.float32(0), z) if relu else z
    np.testing.assert_array_equal(np.asarray(y), z)
  # XLA's pass to float32 rounding (XLA:CPU fuses the last multiply-add into
  # one FMA where the CPU has one), and the kernel under vmap bit for bit
  xla = affine.normalize(x, mean, a, b, "relu" if relu else None, u)
  assert_close(got, np.asarray(xla, np.float64))
  batched = jax.vmap(lambda x: cpu_kernels.normalize(x, view, terms, relu,
                                                     stream))(
      jnp.stack([x, x]))
  np.testing.assert_array_equal(np.asarray(batched[1], np.float32),
                                np.asarray(y, np.float32))


@needs_kernels
def test_output_pass_runs_in_the_kernel_for_wide_rows_only():
  # 3584 channels: the kernel; 64 channels: XLA, whose pass fuses with its
  # neighbours (an add after the layer)
  def lowered(shape, axis):
    config = jaxbn.BatchNormConfig(axis=axis, activation="relu")
    params, state = jaxbn.init(config, shape)
    x = jnp.ones(shape, jnp.float32)
    with cpu_kernels.use("on"):
      return jax.jit(lambda p, x: jaxbn.apply(
          config, p, state, x, training=True)[0] + x).lower(params, x).as_text()
  assert "jaxbn_normalize" in lowered((2, 3, 56, 64), [2, 3])
  assert "jaxbn_normalize" not in lowered((2, 3, 56, 64), -1)


@needs_kernels
@pytest.mark.parametrize("stream", [False, True])
def test_input_gradient_rounds_to_bfloat16_like_xla(stream):
  # a = c = 1, d = m = 0: dx is dy + x rounded once from float32, so every
  # bfloat16 rounding case shows, ties to even, overflow to inf and NaNs.
  rng = np.random.default_rng(5)
  n = 64 * 129
  dy = rng.normal(size=n).astype(np.float32) * np.float32(2.0) ** rng.integers(
      -12, 12, size=n)
  x = rng.normal(size=n).astype(np.float32)
  special = np.array([np.nan, np.inf, -np.inf, 3.0e38, -3.0e38, 0.0, -0.0,
                      1.0], np.float32)
  dy[:8], x[:8] = special, special[::-1]
  dy, x = (jnp.asarray(v, jnp.bfloat16).reshape(64, 129) for v in (dy, x))
  view = cpu_kernels.channel_view((64, 129), (0,))
  coefficients = np.stack([np.ones(129), np.ones(129), np.zeros(129),
                           np.zeros(129)]).astype(np.float32)
  dx = cpu_kernels.input_grad(dy, x, coefficients, view, stream)
  want = (dy.astype(jnp.float32) + x.astype(jnp.float32)).astype(jnp.bfloat16)
  got_bits = np.asarray(dx).view(np.uint16)
  want_bits = np.asarray(want).view(np.uint16)
  nan = np.isnan(np.asarray(want, np.float32))
  np.testing.assert_array_equal(got_bits[~nan], want_bits[~nan])
  assert np.isnan(np.asarray(dx, np.float32)[nan]).all()


@needs_kernels
def test_input_gradient_under_vmap_and_its_derivatives():
  rng = np.random.default_rng(6)
  dy, x, coefficients, view = _input_grad_inputs((6, 5, 4), (0, 2), "float32")
  batch = jnp.asarray(rng.normal(size=(3, 4, 5)).astype(np.float32))
  dys = jnp.stack([dy, 2 * dy, -dy])
  got = jax.vmap(lambda d, c: cpu_kernels.input_grad(d, x, c, view))(dys,
                                                                     batch)
  for i in range(3):
    np.testing.assert_allclose(
        got[i], _reference_input_grad(dys[i], x, batch[i], view), rtol=1e-6,
        atol=1e-5)

  def xla_formula(dy, x, coefficients):
    a, c, d, m = (v.reshape(1, -1, 1) for v in coefficients)
    return a * dy + c * (x - m) + d

  kernel = lambda *args: cpu_kernels.input_grad(*args, view)
  args = (dy, x, jnp.asarray(coefficients))
  tangents = tuple(jnp.asarray(rng.normal(size=np.shape(v)), jnp.float32)
                   for v in args)
  got = jax.jvp(kernel, args, tangents)
  want = jax.jvp(xla_formula, args, tangents)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda c: jnp.sum(jnp.sin(f(dy, x, c)))
  np.testing.assert_allclose(jax.grad(loss(kernel))(args[2]),
                             jax.grad(loss(xla_formula))(args[2]), rtol=1e-5,
                             atol=1e-5)


def _backward_inputs(shape, axes, dtype, seed=8):
  """dy, x and per-channel (mean, variance, scale, d_mean, d_variance, count)
  with non-zero statistic cotangents and one empty channel (count 0)."""
  rng = np.random.default_rng(seed)
  view = cpu_kernels.channel_view(shape, axes)
  dy = jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype)
  x = jnp.asarray((rng.normal(size=shape) * 2 + 3).astype(np.float32), dtype)
  mean, m2 = _reference_moments(np.asarray(x, np.float32), view)
  count = np.full(view.channels, view.a1 * view.a * view.b, np.float64)
  count[0] = 0.0
  variance = np.where(count > 0, m2 / np.maximum(count, 1), 0.0)
  per_channel = [mean, variance, rng.normal(1, 0.3, view.channels),
                 rng.normal(size=view.channels),
                 rng.normal(size=view.channels), count]
  return dy, x, [np.asarray(v, np.float32) for v in per_channel], view


def _reference_backward(dy, x, per_channel, view, epsilon):
  """The closed-form backward in float64 from the float32 inputs."""
  mean, var, scale, d_mean, d_var, n = (np.asarray(v, np.float64)
                                        for v in per_channel)
  dy3, x3 = (_as3(np.asarray(v, np.float32).astype(np.float64), view)
             for v in (dy, x))
  s1 = dy3.sum(axis=(0, 2))
  s2 = (dy3 * (x3 - mean[None, :, None])).sum(axis=(0, 2))
  inv = 1 / np.sqrt(var + np.float32(epsilon))
  a = scale * inv
  safe_n = np.where(n > 0, n, 1)
  c = np.where(n > 0, 2 * (d_var - 0.5 * scale * inv ** 3 * s2) / safe_n, 0)
  d = np.where(n > 0, (d_mean - a * s1) / safe_n, 0) - c * mean
  dx = a[None, :, None] * dy3 + c[None, :, None] * x3 + d[None, :, None]
  return _from3(dx, view, np.shape(x)), s1, s2, (a, c, d)


@needs_kernels
@pytest.mark.parametrize("shape,axes", [v for v in VIEWS if 0 not in v[0]])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stream", [False, True])
def test_backward_in_one_call_matches_float64(shape, axes, dtype, stream):
  dy, x, per_channel, view = _backward_inputs(shape, axes, dtype)
  dx, sum_dy, sum_dy_xc = jax.jit(
      cpu_kernels.backward, static_argnums=(3, 4, 5))(
          dy, x, per_channel, view, 1e-3, stream)
  assert dx.shape == x.shape and dx.dtype == x.dtype
  want_dx, want_s1, want_s2, (a, c, d) = _reference_backward(
      dy, x, per_channel, view, 1e-3)
  x3 = _as3(np.abs(np.asarray(x, np.float32)), view)
  dy3 = _as3(np.abs(np.asarray(dy, np.float32)), view)
  sums_scale = (dy3.sum(axis=(0, 2)) * (1 + x3.max())).max()
  np.testing.assert_allclose(sum_dy, want_s1, atol=1e-6 * sums_scale + 1e-6)
  np.testing.assert_allclose(sum_dy_xc, want_s2, atol=1e-6 * sums_scale + 1e-6)
  # dx's size: the largest term of a dy + c x + d, per channel
  term = _from3(np.abs(a)[None, :, None] * dy3 + np.abs(c)[None, :, None] * x3
                + np.abs(d)[None, :, None], view, np.shape(x))
  got = np.asarray(dx, np.float32)
  if dtype == "float32":
    np.testing.assert_array_less(np.abs(got - want_dx), 1e-5 * term + 1e-7)
  else:  # one rounding to bfloat16 on top of float32 arithmetic
    np.testing.assert_array_less(np.abs(got - want_dx),
                                 2 ** -8 * np.abs(want_dx) + 1e-5 * term + 1e-7)
  # the empty channel (count 0) gets dx = a dy and no correction
  np.testing.assert_allclose(
      np.asarray(_as3(got, view)[:, 0], np.float64),
      (a[0] * _as3(np.asarray(dy, np.float32), view)[:, 0]),
      rtol=2 ** -8 if dtype == "bfloat16" else 1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("shape,axes", [v for v in VIEWS if 0 not in v[0]])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_relu_gates_dy_as_the_forward_decided(shape, axes, dtype,
                                                     masked):
  # The gate recomputes z = (x - mean) a + b from x in float32, each step
  # rounded once (as the output kernel computes y): the kernel with the ReLU
  # equals, bit for bit, the kernel without it on dy zeroed where z <= 0
  # (computed here by NumPy in float32).
  dy, x, per_channel, view = _backward_inputs(shape, axes, dtype)
  rng = np.random.default_rng(3)
  relu = [rng.normal(0, 1, view.channels).astype(np.float32)
          for _ in range(2)]
  rows = None
  if masked:
    rows = jnp.asarray(rng.random(view.a1 * view.g * view.a) > 0.3,
                       jnp.float32)
  run = jax.jit(cpu_kernels.backward, static_argnums=(3, 4, 5))
  got = run(dy, x, per_channel, view, 1e-3, False, rows, relu)
  per3 = lambda v: np.asarray(v, np.float32)[None, :, None]
  z = ((_as3(np.asarray(x, np.float32), view) - per3(per_channel[0]))
       * per3(relu[0]) + per3(relu[1]))
  assert 0.2 < np.mean(z > 0) < 0.8  # the gate does something
  gated = np.where(z > 0, _as3(np.asarray(dy, np.float32), view), 0)
  gated_dy = jnp.asarray(_from3(gated, view, shape), dtype)
  want = run(gated_dy, x, per_channel, view, 1e-3, False, rows)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(w, np.float32))


@needs_kernels
@pytest.mark.parametrize("shape,axes", [((64, 8, 8, 16), (0, 1, 2)),
                                        ((16, 24, 9, 9), (0, 2, 3)),
                                        ((7, 5, 17), (0, 1)),
                                        ((5, 4, 3, 2), (0, 3))])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_in_units_is_that_of_x_times_the_unit(shape, axes, dtype):
  # With per-channel units u (powers of two; the overflow guard's), the one
  # call is the backward of x u, whose statistics and ReLU coefficients it
  # is given, with dx = u times its gradient: the plain loops where a unit
  # is not 1 against the vector loops on x u, masked rows and the fused
  # ReLU included, and the XLA fallback exported programs run.
  dy, x, per_channel, view = _backward_inputs(shape, axes, dtype)
  rng = np.random.default_rng(5)
  unit = np.exp2(rng.choice([0, -40, 20, -3], view.channels)).astype(
      np.float32)
  unit[0] = 1.0
  relu = [rng.normal(0, 1, view.channels).astype(np.float32)
          for _ in range(2)]
  rows = jnp.asarray(rng.random(view.a1 * view.g * view.a) > 0.3,
                     jnp.float32)
  in_view = lambda v: np.asarray(v, np.float32).reshape(view.shape)
  per = lambda v: np.asarray(v).reshape(1, view.g, 1, view.c, 1)
  x_units = jnp.asarray((in_view(x) * per(unit)).reshape(shape), dtype)
  run = jax.jit(cpu_kernels.backward, static_argnums=(3, 4, 5))
  got = run(dy, x, (*per_channel, jnp.asarray(unit)), view, 1e-3, False,
            rows, relu)
  # epsilon in units is epsilon u^2; the vector loops take one epsilon: 0
  # here, the variance given with it added
  eps_units = 1e-3 * unit.astype(np.float64) ** 2
  with_eps = list(per_channel)
  with_eps[1] = (per_channel[1] + eps_units).astype(np.float32)
  want_dx, want_s1, want_s2 = run(dy, x_units, with_eps, view, 0.0, False,
                                  rows, relu)
  want_dx = (in_view(want_dx) * per(unit)).reshape(shape)
  scale = lambda v: np.abs(np.asarray(v, np.float32)).max() + 1e-30
  for got_value, want in ((got[1], want_s1), (got[2], want_s2)):
    np.testing.assert_allclose(got_value, want, rtol=1e-5,
                               atol=1e-6 * scale(want))
  got_dx = np.asarray(got[0], np.float32)
  # per element: relative, plus a share of its channel's largest dx
  largest = np.abs(_as3(want_dx, view)).max(axis=(0, 2))
  floor = _from3(np.broadcast_to(largest[None, :, None],
                                 _as3(want_dx, view).shape), view, shape)
  relative = 2 ** -7 if dtype == "bfloat16" else 1e-5
  np.testing.assert_array_less(np.abs(got_dx - want_dx),
                               relative * np.abs(want_dx) + 1e-6 * floor
                               + 1e-37)
  fallback = cpu_kernels._xla_backward(
      dy, x, *per_channel, jnp.asarray(unit), rows, *relu, view=view,
      masked=True, epsilon=1e-3, relu=True, units=True)
  for f, g in zip(fallback, got):
    np.testing.assert_allclose(np.asarray(f, np.float32),
                               np.asarray(g, np.float32), rtol=2e-2,
                               atol=1e-5 * scale(g))


@needs_kernels
def test_backward_in_one_call_under_vmap():
  dy, x, per_channel, view = _backward_inputs((6, 5, 4), (0, 2), "float32")
  scales = jnp.stack([per_channel[2], 2 * per_channel[2], -per_channel[2]])
  dys = jnp.stack([dy, -dy, 0.5 * dy])

  def one(dy, scale):
    terms = list(per_channel)
    terms[2] = scale
    return cpu_kernels.backward(dy, x, terms, view, 1e-3)

  got = jax.jit(jax.vmap(one))(dys, scales)
  for i in range(3):
    terms = list(per_channel)
    terms[2] = np.asarray(scales[i])
    want = _reference_backward(dys[i], x, terms, view, 1e-3)[:3]
    for g, w in zip(got, want):
      np.testing.assert_allclose(g[i], w, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape,axis,activation", [
    ((8, 3, 3, 6), -1, None), ((8, 6, 3, 3), 1, None),
    ((12, 3072), -1, "relu")])  # wide rows: the forward's output kernel
def test_grad_of_grad_through_the_one_call_backward(shape, axis, activation):
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32) + 2)
  config = jaxbn.BatchNormConfig(axis=axis, activation=activation)
  params, state = jaxbn.init(config, x.shape)
  params = jax.tree.map(lambda p: p + 0.3, params)

  def outer(params, x):
    # the norm of the input gradient, differentiated again
    loss = lambda p, x: jnp.sum(jnp.sin(jaxbn.apply(config, p, state, x,
                                                    training=True)[0]) * x)
    g = jax.grad(loss, argnums=1)(params, x)
    return jnp.sum(g ** 2)

  results = {}
  for mode in ("on", "off"):
    with cpu_kernels.use(mode):
      f = jax.jit(jax.grad(outer, argnums=(0, 1)))
      results[mode] = f(params, x)
      inner = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxbn.apply(
          config, p, state, x, training=True)[0] * x), argnums=1))
      assert ("jaxbn_backward" in inner.lower(params, x).as_text()) == (
          mode == "on")
  plain = jaxbn.BatchNormConfig(axis=axis, activation=activation, fused=False)

  def outer_reference(params, x):
    loss = lambda p, x: jnp.sum(jnp.sin(jaxbn.apply(plain, p, state, x,
                                                    training=True)[0]) * x)
    g = jax.grad(loss, argnums=1)(params, x)
    return jnp.sum(g ** 2)

  reference = jax.grad(outer_reference, argnums=(0, 1))(params, x)
  for got in (results["on"], results["off"]):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_moments_exact_when_first_value_is_an_outlier_and_the_mean_drifts(
    layout):
  # The kernel shifts each channel's double sums by its first value: make
  # that value an outlier, and let the second half of the batch sit 1e4
  # higher than the first, across many parts of the work.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(64, 16, 16, 8)).astype(np.float32)
  x[32:] += np.float32(1e4)
  x[0, 0, 0] = 5e5
  if layout == "NCHW":
    x, axes = np.ascontiguousarray(x.transpose(0, 3, 1, 2)), (0, 2, 3)
  else:
    axes = (0, 1, 2)
  view = cpu_kernels.channel_view(x.shape, axes)
  mean, m2 = cpu_kernels.moments(jnp.asarray(x), view)
  want_mean, want_m2 = _reference_moments(x, view)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(m2, want_m2, rtol=1e-6)


@needs_kernels
@given(data=st.data())
def test_moments_property_random_layouts(data):
  rank = data.draw(st.integers(2, 4))
  shape = data.draw(hnp.array_shapes(min_dims=rank, max_dims=rank,
                                     min_side=1, max_side=9))
  channel = data.draw(st.integers(0, rank - 1))
  axes = tuple(i for i in range(rank) if i != channel)
  center = data.draw(st.sampled_from([0.0, 50.0, -3e3]))
  x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(
      -4, 4, width=32))) + np.float32(center)
  view = cpu_kernels.channel_view(shape, axes)
  mean, m2 = cpu_kernels.moments(jnp.asarray(x), view)
  want_mean, want_m2 = _reference_moments(x, view)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-5)
  # float32 data around `center` carry ulp(center) of rounding already
  np.testing.assert_allclose(m2, want_m2, rtol=1e-4,
                             atol=1e-4 * (1 + abs(center)) * x.size)


@needs_kernels
def test_results_are_bit_identical_run_to_run_and_under_vmap():
  rng = np.random.default_rng(2)
  xs = jnp.asarray(rng.normal(size=(3, 512, 48)).astype(np.float32) + 7)
  view = cpu_kernels.channel_view((512, 48), (0,))
  one = [cpu_kernels.moments(x, view) for x in xs]
  again = [cpu_kernels.moments(x, view) for x in xs]
  batched = jax.vmap(lambda x: cpu_kernels.moments(x, view))(xs)
  for i in range(3):
    for a, b, c in zip(one[i], again[i], (batched[0][i], batched[1][i])):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)


@needs_kernels
def test_derivatives_equal_those_of_the_xla_formulation():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(6, 5, 4)).astype(np.float32) + 2)
  t = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  dy = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  axes = (0, 2)
  view = cpu_kernels.channel_view(x.shape, axes)

  def kernel_stats(x):
    mean, m2 = cpu_kernels.moments(x, view)
    return mean, m2

  def xla_stats(x):
    _, mean, m2 = stats.local_moments(x, axes)
    return mean.reshape(-1), m2.reshape(-1)

  for f_kernel, f_xla in [(kernel_stats, xla_stats)]:
    got = jax.jvp(f_kernel, (x,), (t,))
    want = jax.jvp(f_xla, (x,), (t,))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def kernel_sums(dy, x, mean):
    return cpu_kernels.grad_sums(dy, x, mean, view)

  def xla_sums(dy, x, mean):
    m = mean.reshape(1, -1, 1)
    return jnp.sum(dy, axis=axes), jnp.sum(dy * (x - m), axis=axes)

  mean = jnp.mean(x, axis=axes)
  args = (dy, x, mean)
  tangents = (t, 2 * t, mean * 0.5)
  got = jax.jvp(kernel_sums, args, tangents)
  want = jax.jvp(xla_sums, args, tangents)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # reverse mode through the jvp rule (as grad of grad of a layer does)
  g_kernel = jax.grad(lambda x: jnp.sum(kernel_sums(dy, x, mean)[1] ** 2))(x)
  g_xla = jax.grad(lambda x: jnp.sum(xla_sums(dy, x, mean)[1] ** 2))(x)
  np.testing.assert_allclose(g_kernel, g_xla, rtol=1e-4, atol=1e-4)


def _step(config, params, state, x, dy):
  (y, new_state), vjp = jax.vjp(
      lambda p, x: jaxbn.apply(config, p, state, x, training=True), params, x)
  return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))


def _step_with_and_without_kernels(x, dy, axis):
  """The training step's outputs with kernels 'on' and 'off', and whether
  each mode's HLO calls the kernels."""
  config = jaxbn.BatchNormConfig(axis=axis, momentum=0.5)
  params, state = jaxbn.init(config, x.shape)
  results = {}
  for mode in ("on", "off"):
    with cpu_kernels.use(mode):
      step = jax.jit(lambda *a: _step(config, *a))
      hlo = step.lower(params, state, x, dy).as_text()
      results[mode] = step(params, state, x, dy)
    # on one device the backward is one call
    for kernel in ("jaxbn_moments", "jaxbn_backward"):
      assert (kernel in hlo) == (mode == "on")
    assert "jaxbn_grad_sums" not in hlo and "jaxbn_input_grad" not in hlo
  return zip(jax.tree.leaves(results["on"]), jax.tree.leaves(results["off"]))


@needs_kernels
@pytest.mark.parametrize("shape,axis", [((16, 6, 6, 24), -1),
                                        ((16, 24, 6, 6), 1),
                                        ((128, 40), -1)])
@pytest.mark.parametrize("center", [0.0, 1e4])
def test_fast_path_with_and_without_kernels_agree(shape, axis, center):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32) + center)
  dy = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  # Both means carry float32 rounding of ~ulp(center) (1e-3 at 1e4), which
  # moves x - mean, hence y and the gradients, by that much times 1/std.
  rounding = 2e-5 + 2 * float(np.spacing(np.float32(center)))
  for a, b in _step_with_and_without_kernels(x, dy, axis):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=rounding * scale)


@needs_kernels
@pytest.mark.parametrize("axis", [-1, 1])
def test_bfloat16_fast_path_with_and_without_kernels_agree(axis):
  rng = np.random.default_rng(6)
  shape = (16, 24, 6, 6) if axis == 1 else (16, 6, 6, 24)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 30, jnp.bfloat16)
  dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  for a, b in _step_with_and_without_kernels(x, dy, axis):
    assert a.dtype == b.dtype
    # float32 results (statistics, state, parameter gradients) agree to
    # float32 rounding, bf16 ones (y, dx) to a bf16 ulp
    tol = 1e-2 if a.dtype == jnp.bfloat16 else 2e-5
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(b).max() + 1e-6
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@needs_kernels
def test_fast_path_with_kernels_matches_the_numpy_reference():
  rng = np.random.default_rng(5)
  shape = (32, 5, 5, 12)
  x = rng.normal(size=shape).astype(np.float32) * 3 + 500
  dy = rng.normal(size=shape).astype(np.float32)
  config = jaxbn.BatchNormConfig(momentum=0.9, epsilon=1e-3)
  params, state = jaxbn.init(config, shape)
  with cpu_kernels.use("on"):
    y, new_state, (grads, dx) = jax.jit(lambda *a: _step(config, *a))(
        params, state, jnp.asarray(x), jnp.asarray(dy))
  x64 = np.asarray(x, np.float64)
  mean = x64.mean(axis=(0, 1, 2))
  var = x64.var(axis=(0, 1, 2))
  inv = 1 / np.sqrt(var + 1e-3)
  np.testing.assert_allclose(y, (x64 - mean) * inv, rtol=1e-4, atol=1e-4)
  xhat = (x64 - mean) * inv
  n = x64.size / shape[-1]
  want_dx = inv / n * (n * dy - dy.sum(axis=(0, 1, 2))
                       - xhat * (dy * xhat).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(grads["gamma"], (dy * xhat).sum(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-3)
  bessel = n / (n - 1)  # Keras' fused estimator (4-D input, last axis)
  np.testing.assert_allclose(new_state["moving_variance"],
                             0.9 + 0.1 * var * bessel, rtol=1e-5)


@needs_kernels
def test_kernels_under_shard_map_equal_one_device():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(64, 4, 4, 8)).astype(np.float32) + 20)
  dy = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  config = jaxbn.BatchNormConfig(momentum=0.5)
  params, state = jaxbn.init(config, x.shape)
  with cpu_kernels.use("on"):
    one = jax.jit(lambda *a: _step(config, *a))(params, state, x, dy)

    def local(params, state, x, dy):
      (y, new_state), vjp = jax.vjp(
          lambda p, x: jaxbn.apply(config, p, state, x, training=True,
                                   axis_name="data"), params, x)
      # gradients of the replicated parameters come back summed over devices
      return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))

    sharded = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P("data"), P(), (P(), P("data")))))
    many = sharded(params, state, x, dy)
    hlo = sharded.lower(params, state, x, dy).as_text()
    # the sums are combined across devices between the backward's two calls
    for kernel in ("jaxbn_moments", "jaxbn_grad_sums", "jaxbn_input_grad"):
      assert kernel in hlo
    assert "jaxbn_backward" not in hlo
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_batch_sharded_jit_auto_stays_in_xla_and_on_is_still_correct():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rng = np.random.default_rng(7)
  x = jax.device_put(jnp.asarray(rng.normal(size=(64, 8)), jnp.float32),
                     NamedSharding(mesh, P("data")))
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, x.shape)
  outputs, hlos = {}, {}
  for mode in ("auto", "on"):
    with cpu_kernels.use(mode):
      step = jax.jit(lambda *a: _step(config, *a))
      outputs[mode] = step(params, state, x, x)
      hlos[mode] = step.lower(params, state, x, x).compile().as_text()
  # 'auto' with 8 devices: XLA's reductions, partitioned, no gather of x
  # (the statistics' shift gathers its 16 samples per channel, no more)
  assert "jaxbn_" not in hlos["auto"]
  gathered = [math.prod(int(d) for d in dims.split(",") if d) for dims in
              re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlos["auto"])]
  assert all(size <= stats.SHIFT_SAMPLES * x.shape[1] for size in gathered)
  # 'on': the custom call sees all of x (XLA gathers it), same numbers
  assert "jaxbn_moments" in hlos["on"] and "all-gather" in hlos["on"]
  for a, b in zip(jax.tree.leaves(outputs["on"]),
                  jax.tree.leaves(outputs["auto"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernels_are_skipped_where_they_do_not_apply():
  x = jnp.ones((4, 3, 5), jnp.float32)
  mean = jnp.ones((3,), jnp.float32)
  with cpu_kernels.use("on"):
    assert cpu_kernels.applicable(x.astype(jnp.float16), (0, 2)) is None
    assert cpu_kernels.applicable(x, (0, 2), dy=x.astype(jnp.bfloat16)) is None
    assert cpu_kernels.applicable(x.astype(jnp.bfloat16), (0, 2),
                                  per_channel=mean.astype(jnp.bfloat16)) is None
    # masks: per row (every axis before the channels) run in the kernels;
    # varying along the channels or the axes after them, in XLA
    assert cpu_kernels.applicable(x, (0, 2), jnp.ones((4, 1, 1))) is not None
    assert cpu_kernels.applicable(x, (0, 2), jnp.ones((4, 3, 1))) is None
    assert cpu_kernels.applicable(x, (0, 2), jnp.ones((4, 1, 5))) is None
    y = jnp.ones((4, 3, 5, 2, 2), jnp.float32)
    assert cpu_kernels.applicable(y, (1, 3)) is None  # kept axes 0, 2, 4
  with cpu_kernels.use("off"):
    assert cpu_kernels.applicable(x, (0, 2)) is None


def test_channel_view_of_common_layouts():
  view = cpu_kernels.channel_view
  assert view((8, 4, 4, 16), (0, 1, 2)) == (1, 1, 128, 16, 1)
  assert view((8, 16, 4, 4), (0, 2, 3)) == (1, 1, 8, 16, 16)
  assert view((8, 3, 4, 5), (0, 3)) == (1, 1, 8, 12, 5)
  # a group axis before the channels (virtual batches: strided, contiguous)
  assert view((8, 3, 4, 5), (0, 2)) == (8, 3, 4, 5, 1)
  assert view((2, 4, 4, 4, 16), (0, 2, 3)) == (2, 4, 16, 16, 1)
  assert view((4, 2, 16, 4, 4), (1, 3, 4)) == (1, 4, 2, 16, 16)
  assert view((8, 3, 4, 5, 6), (1, 3)) is None  # three kept runs


def test_bad_mode_names_the_value():
  with pytest.raises(ValueError, match="'fast'"):
    cpu_kernels.set_mode("fast")
  assert cpu_kernels.get_mode() in cpu_kernels.MODES


@needs_kernels
def test_kernels_register_only_with_a_compatible_ffi(monkeypatch):
  from jaxbn import _cpu_kernels as built
  major, minor = built.build_info()["ffi_api"]
  for running, ok in [((major, minor), True), ((major, minor + 1), True),
                      ((major, minor - 1), False), ((major + 1, 0), False)]:
    monkeypatch.setattr(cpu_kernels, "_framework_ffi_api", lambda: running)
    reason = cpu_kernels._why_not_registered()
    assert (reason is None) == ok, (running, reason)
    if not ok:
      assert f"{major}.{minor}" in reason and "jaxlib" in reason


def test_kernels_off_in_the_environment_registers_them_only_when_asked():
  # JAXBN_CPU_KERNELS=off registers nothing at import; a later 'on' (a
  # scope or the global mode) registers them and they run
  import subprocess
  import sys
  code = """if True:
    import jax, jax.numpy as jnp, numpy as np, jaxbn
    from jaxbn import cpu_kernels
    print(cpu_kernels.available(), cpu_kernels.NOT_REGISTERED,
          float(jnp.ones(3).sum()))
    config = jaxbn.BatchNormConfig()
    x = jnp.asarray(np.random.RandomState(0).randn(8, 4, 4, 16), jnp.float32)
    params, state = jaxbn.init(config, x.shape)
    step = lambda x: jaxbn.apply(config, params, state, x, training=True)[0]
    off = jax.jit(step)(x)
    with cpu_kernels.use("on"):
      text = jax.jit(step).lower(x).as_text()
      on = jax.jit(step)(x)
    print(cpu_kernels.available(), "jaxbn_moments" in text,
          float(jnp.max(jnp.abs(on - off))))
  """
  if not cpu_kernels.available():
    pytest.skip("the kernels are not built")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=True,
                       env={"JAXBN_CPU_KERNELS": "off", "JAX_PLATFORMS": "cpu",
                            "PATH": ""}).stdout.split()
  assert out[:2] == ["False", "JAXBN_CPU_KERNELS=off"] and out[2] == "3.0"
  assert out[3:5] == ["True", "True"] and float(out[5]) < 1e-5


def test_info_explains_the_kernels():
  from jaxbn import info
  report = info.report()
  assert report["jax"] == jax.__version__
  registered = report["kernels registered"]
  assert registered.startswith("yes") == cpu_kernels.available()
  with cpu_kernels.use("off"):
    assert "mode 'off'" in info.report()["kernels used for float32 NHWC on CPU"]


@needs_kernels
@pytest.mark.parametrize("case", ["plain", "mask", "relu", "units",
                                  "bfloat16"])
def test_parameter_gradients_alone_skip_the_input_gradient_pass(case):
  # A batch norm on the network's input: nothing reads its dx. The one-call
  # backward's DCE rule keeps the call's sums and drops its input-gradient
  # pass (dx a one-element placeholder): same parameter gradients, no
  # input-sized buffer; an exported program (the XLA fallback) agrees.
  rng = np.random.RandomState(3)
  shape = (32, 16, 16, 64)
  x = rng.randn(*shape) * 3 + 1
  if case == "units":
    x[..., 5] *= 1e25  # a channel measured in units: the plain loops
  dtype = jnp.bfloat16 if case == "bfloat16" else jnp.float32
  x, dy = jnp.asarray(x, dtype), jnp.asarray(rng.randn(*shape), dtype)
  config = jaxbn.BatchNormConfig(
      activation="relu" if case == "relu" else None)
  mask = jnp.asarray(rng.rand(shape[0]) > 0.3) if case == "mask" else None
  params, state = jaxbn.init(config, shape)

  def loss(params, x, dy):
    y, _ = jaxbn.apply(config, params, state, x, training=True, mask=mask)
    return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

  # the overflow guard on (this module runs without it): units need it
  with cpu_kernels.use("on"), modes.overflow_guard("on"):
    alone = jax.jit(jax.grad(loss))
    compiled = alone.lower(params, x, dy).compile()
    got = alone(params, x, dy)
    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x, dy)[0]
    exported = jax.export.export(alone)(params, x, dy).call(params, x, dy)
  calls = [line for line in compiled.as_text().splitlines()
           if 'custom_call_target="jaxbn_backward"' in line]
  assert len(calls) == 1 and re.search(r"= \((f32|bf16)\[1\]", calls[0]), calls
  assert compiled.memory_analysis().temp_size_in_bytes <= 0.05 * x.nbytes
  for name in ("gamma", "beta"):
    np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_allclose(exported[name], want[name], rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want[name]).max()))
