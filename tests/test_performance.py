"""Deterministic performance checks (XLA's own counts, never timings).

On CPU a training step (forward + backward) of the fast path moves 8x the
input's bytes with the CPU kernels (one read for the statistics, one read +
one write for y, then the backward in one call: one read each of dy and x
for the sums, two reads + one write for dx) and 10x in XLA alone (the statistics and the backward sums
take two reads each); it needs no full-size temporary buffer and saves
nothing but the input (and per-channel vectors) for the backward pass.
Inference is one multiply-add pass: read x, write y. Bytes are XLA's
``cost_analysis`` plus what the kernels' custom calls read and write
(``jaxbn.traffic.bytes_moved``), counted for the program ordinary data run
(``jaxbn.traffic.ordinary_path_bytes``: without the overflow guard's retake, a
``lax.cond`` branch that runs only for a channel spread beyond 2^30). The
temporary memory is that program's too; the real program's adds at most
0.05x the largest argument (:func:`guard_temp_bound`): the guard's branches
read x through the same fused passes (each with its own copies of its
per-channel operands, so no broadcast of them is written out in full).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import cpu_kernels, modes, stats
from jaxbn.traffic import bytes_moved

CASES = [((16, 28, 28, 64), -1, "float32"), ((16, 28, 28, 64), -1, "bfloat16"),
         ((16, 64, 28, 28), 1, "float32"), ((16, 64, 28, 28), 1, "bfloat16"),
         ((256, 512), -1, "float32")]


def _analysis(fn, *args):
  """``(bytes, temp, hlo)`` of the ordinary program (the guard off); the
  real program's temporary memory is checked against it."""
  compiled = jax.jit(fn).lower(*args).compile()
  with modes.overflow_guard("off"):
    ordinary = jax.jit(fn).lower(*args).compile()
  temp = ordinary.memory_analysis().temp_size_in_bytes
  assert compiled.memory_analysis().temp_size_in_bytes <= guard_temp_bound(
      temp, args)
  return bytes_moved(ordinary), temp, compiled.as_text()


def guard_temp_bound(ordinary_temp, args):
  """At most 0.05x the largest argument more than the ordinary program (see
  the module's docstring)."""
  largest = max(leaf.nbytes for leaf in jax.tree_util.tree_leaves(args))
  return ordinary_temp + 0.05 * largest


def _setup(shape, axis, dtype):
  config = jaxbn.BatchNormConfig(axis=axis)
  params, state = jaxbn.init(config, shape)
  x = jnp.ones(shape, dtype)
  return config, params, state, x


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("shape,axis,dtype", CASES)
def test_training_step_traffic_temp_memory_and_residuals(shape, axis, dtype,
                                                         mode):
  config, params, state, x = _setup(shape, axis, dtype)

  def step(params, x, dy):
    f = lambda p, x: jaxbn.apply(config, p, state, x, training=True)[0]
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(dy)

  with cpu_kernels.use(mode):
    bytes_accessed, temp, hlo = _analysis(step, params, x, x)
  kernels = "jaxbn_moments" in hlo
  assert kernels == (mode == "on" and dtype in ("float32", "bfloat16"))
  assert ("jaxbn_backward" in hlo) == kernels
  if not kernels:
    # XLA's cost analysis charges the shift's sample (64 strided values per
    # channel, see stats.sampled_shift) as a read of all of a bf16 or 2-D x:
    # take out what it charges for the sample alone
    axes = config.resolve(shape).reduction_axes
    bytes_accessed -= _analysis(lambda x: stats.sampled_shift(x, axes), x)[0]
  assert bytes_accessed <= (8.2 if kernels else 10.2) * x.nbytes
  channel_vector = 4 * np.prod(config.resolve(shape).param_shape)
  assert temp <= max(0.01 * x.nbytes, 16 * channel_vector)
  _, vjp_fn = jax.vjp(lambda p, x: jaxbn.apply(
      config, p, state, x, training=True)[0], params, x)
  # the input (possibly as a free reshape of it) plus per-channel vectors
  saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_fn))
  assert saved - x.nbytes <= 0.05 * x.nbytes


def _step_temp(kwargs, mask, wrt, dtype, shape, value):
  """Temp bytes ÷ x's of a compiled training step under the current modes:
  the gradient with respect to ``wrt`` (0: the parameters; 1: x) of the
  loss ``sum(y r)``, with that loss too where ``value`` (a loop that
  reports its loss: XLA:CPU's reduction over y then meets jaxbn's passes)."""
  config = jaxbn.BatchNormConfig(**kwargs)
  params, state = jaxbn.init(config, shape)
  x = jnp.ones(shape, dtype)

  def step(params, x, r):
    def loss(p, x):
      y, _ = jaxbn.apply(config, p, state, x, training=True, mask=mask)
      return jnp.sum(y.astype(jnp.float32) * r.astype(jnp.float32))
    take = jax.value_and_grad if value else jax.grad
    return take(loss, argnums=wrt)(params, x)

  compiled = jax.jit(step).lower(params, x, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / x.nbytes


@pytest.mark.parametrize("value", [False, True], ids=["grad", "value_and_grad"])
@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_masked_or_gated_training_step_needs_no_input_sized_buffer(
    dtype, mode, value):
  # the masked sums take each row's sum first, then leave padding out (a
  # select over every element is written out in full by XLA:CPU), the
  # guard's branches included (the module runs with the guard on); the
  # fused ReLU's gate enters XLA:CPU's sums as a product, also for the
  # gradient of the parameters alone (no dx whose buffer the gated dy
  # could share); with the loss returned, its reduction over y takes in
  # the output pass, which shares nothing with the backward's passes
  mask = jnp.arange(32) % 3 != 0
  cases = [({}, mask, (0, 1)), ({"activation": "relu"}, None, 0),
           ({"activation": "relu"}, mask, 0)]
  if value:
    cases += [({}, None, (0, 1)), ({"activation": "relu"}, mask, (0, 1))]
  for kwargs, m, wrt in cases:
    with cpu_kernels.use(mode):
      temp = _step_temp(kwargs, m, wrt, dtype, (32, 16, 16, 64), value)
    assert temp <= 0.05, (kwargs, m is not None, wrt, temp)


@pytest.mark.parametrize("value", [False, True], ids=["grad", "value_and_grad"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gpu_tpu_algorithm_needs_no_input_sized_buffer(dtype, value):
  # compiled for CPU (what a CPU mesh with an automatic axis runs): the
  # one-read sums are siblings on GPU/TPU and, for XLA:CPU, each its own
  # pass in arithmetic alone (stats.sibling_sums, stats.scaled_sums), the
  # guard on, a row mask applied to each row's sums
  mask = jnp.arange(32) % 3 != 0
  cases = [({}, None, (0, 1)), ({}, mask, (0, 1)),
           ({"activation": "relu"}, None, (0, 1)), ({}, None, 0),
           ({}, mask, 0), ({"activation": "relu"}, None, 0),
           ({"activation": "relu"}, mask, 0)]
  for kwargs, m, wrt in cases:
    with modes.statistics("accelerator"):
      temp = _step_temp(kwargs, m, wrt, dtype, (32, 16, 16, 64), value)
    assert temp <= 0.05, (kwargs, m is not None, wrt, temp)


@pytest.mark.parametrize("value", [False, True], ids=["grad", "value_and_grad"])
@pytest.mark.parametrize("path", ["xla", "accelerator"])
def test_ghost_batches_and_axis_lists_in_bfloat16_need_no_input_sized_buffer(
    path, value):
  # bfloat16 on the XLA:CPU paths: a virtual-batch view of x or dy read by
  # a float32 pass is taken in float32 by XLA:CPU, which wrote a bf16 copy
  # out for the sums' barrier (1.0x; stats.view_of); the sampled shift of
  # an axis list (2048 channels of 2048 values) wrote out its ranks, counts
  # and choice in int32 and float32 (0.096x; stats._lower_median)
  mask = jnp.arange(64) % 3 != 0
  cases = [({"virtual_batch_size": 16}, None, (0, 1)),
           ({"virtual_batch_size": 16, "activation": "relu"}, mask, (0, 1)),
           ({"axis": [2, 3]}, None, 0)]
  for kwargs, m, wrt in cases:
    scope = (cpu_kernels.use("off") if path == "xla" else
             modes.statistics("accelerator"))
    with scope:
      temp = _step_temp(kwargs, m, wrt, "bfloat16", (64, 32, 32, 64), value)
    assert temp <= 0.05, (kwargs, m is not None, wrt, temp)


@pytest.mark.parametrize("path", ["kernels", "xla", "accelerator"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sequence_mask_needs_no_input_sized_buffer(dtype, path):
  # a (batch, time) mask over (batch, time, channels) varies along every
  # reduced axis, so its padding is left out per element: on XLA:CPU its
  # sums are products (each sum with its own copy of the mask) with a
  # select retake in one loop for non-finite channels, the overflow
  # guard's magnitude a loop too, and the shift's search among the valid
  # positions a binary search (comparing every position with every sample
  # wrote out a quarter of x)
  shape = (32, 128, 64)
  mask = (jnp.arange(32 * 128) % 3 != 0).reshape(32, 128)
  scope = {"kernels": lambda: cpu_kernels.use("on"),
           "xla": lambda: cpu_kernels.use("off"),
           "accelerator": lambda: modes.statistics("accelerator")}[path]
  cases = [({}, (0, 1), True), ({"activation": "relu"}, 0, False)]
  for kwargs, wrt, value in cases:
    with scope():
      temp = _step_temp(kwargs, mask, wrt, dtype, shape, value)
    assert temp <= 0.05, (kwargs, wrt, value, temp)


def test_the_shift_of_a_small_batch_needs_no_batch_sized_buffer():
  # the sampled shift's ranks (stats._lower_median) of 64 rows x 1024
  # channels: 64 x 64 comparisons per channel, counted in blocks that
  # XLA:CPU fuses into their sums (one sum over the 64 was written out in
  # full first: 66x the input)
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, (64, 1024))
  x = jnp.ones((64, 1024))

  def step(params, x, dy):
    f = lambda p, x: jnp.sum(jaxbn.apply(config, p, state, x,
                                         training=True)[0] * dy)
    return jax.grad(f, argnums=(0, 1))(params, x)

  with modes.statistics("accelerator"):
    compiled = jax.jit(step).lower(params, x, x).compile()
  channel_vector = 4 * 1024
  assert compiled.memory_analysis().temp_size_in_bytes <= 16 * channel_vector


@pytest.mark.parametrize("shape,axis,dtype", CASES)
def test_inference_is_one_pass(shape, axis, dtype):
  config, params, state, x = _setup(shape, axis, dtype)
  bytes_accessed, temp, _ = _analysis(
      lambda p, x: jaxbn.apply(config, p, state, x, training=False)[0],
      params, x)
  assert bytes_accessed <= 2.05 * x.nbytes
  assert temp <= 0.01 * x.nbytes


def _full_size_fusions(hlo, shape):
  dims = ",".join(str(d) for d in shape)
  entry = hlo[hlo.index("ENTRY"):]
  return [line for line in entry.splitlines()
          if " fusion(" in line
          and f"[{dims}]" in line.split(" fusion(")[0].split(" = ")[-1]]


def test_elementwise_neighbours_fuse_into_the_inference_pass():
  config, params, state, x = _setup((16, 28, 28, 64), -1, "float32")

  def block(params, x, residual):
    y, _ = jaxbn.apply(config, params, state, x, training=False)
    return jax.nn.relu(y + residual)

  bytes_accessed, _, hlo = _analysis(block, params, x, x)
  assert bytes_accessed <= 3.05 * x.nbytes  # read x, read residual, write
  assert len(_full_size_fusions(hlo, x.shape)) == 1


def test_elementwise_neighbours_fuse_into_the_training_output():
  config, params, state, x = _setup((16, 28, 28, 64), -1, "float32")

  def block(params, x, residual):
    y, _ = jaxbn.apply(config, params, state, x, training=True)
    return jax.nn.relu(y + residual)

  bytes_accessed, _, hlo = _analysis(block, params, x, x)
  # the statistics (one read with the kernels, two without), then x and
  # residual in, the block out
  assert bytes_accessed <= 5.1 * x.nbytes
  assert len(_full_size_fusions(hlo, x.shape)) == 1


def test_fast_path_moves_fewer_bytes_than_flax():
  shape = (16, 28, 28, 64)
  config, params, state, x = _setup(shape, -1, "float32")
  layer = nn.BatchNorm(use_running_average=False)
  variables = layer.init(jax.random.PRNGKey(0), x)

  def ours(params, x, dy):
    f = lambda p, x: jaxbn.apply(config, p, state, x, training=True)[0]
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(dy)

  def theirs(params, x, dy):
    f = lambda p, x: layer.apply({"params": p, **{
        "batch_stats": variables["batch_stats"]}}, x,
                                 mutable=["batch_stats"])[0]
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(dy)

  ours_bytes, _, _ = _analysis(ours, params, x, x)
  theirs_bytes, _, _ = _analysis(theirs, variables["params"], x, x)
  assert ours_bytes < 0.75 * theirs_bytes


def test_remat_can_keep_only_the_named_statistics():
  config, params, state, _ = _setup((8, 4, 4, 16), -1, "float32")
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 16))
  policy = jax.checkpoint_policies.save_only_these_names(
      "jaxbn_batch_mean", "jaxbn_batch_variance")

  def loss(params, x):
    y, _ = jaxbn.apply(config, params, state, x, training=True)
    return jnp.sum(jnp.sin(y))

  g_plain = jax.grad(loss, argnums=(0, 1))(params, x)
  g_remat = jax.grad(jax.checkpoint(loss, policy=policy),
                     argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_plain),
                  jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_repeated_shape_reuses_the_traced_statistics():
  # a model repeats its layers' shapes, and jit traces a step again for a
  # new closure: the statistics' algorithms (the GPU/TPU one is traced on
  # CPU too, beside the CPU one) are traced once per input signature and
  # mode, then inlined from JAX's cache
  import sys
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, (8, 4, 4, 16))
  x = jnp.ones((8, 4, 4, 16))
  cached = {getattr(f, "__wrapped__", f).__code__ for f in (
      stats.scaled_moments, stats.local_moments, stats.local_moments_shifted)}

  def trace():
    f = lambda p, x: jnp.sum(jaxbn.apply(config, p, state, x,
                                         training=True)[0])
    jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(params, x)

  def entered_during(fn):
    entered = set()

    def profile(frame, event, arg):
      if event == "call" and frame.f_code in cached:
        entered.add(frame.f_code.co_name)
    sys.setprofile(profile)
    try:
      fn()
    finally:
      sys.setprofile(None)
    return entered

  # users' default mode (both algorithms traced), the retake's two-pass
  # moments in XLA too
  with modes.statistics("auto"), cpu_kernels.use("off"):
    jax.clear_caches()
    assert entered_during(trace) == {"scaled_moments", "local_moments",
                                     "local_moments_shifted"}
    assert entered_during(trace) == set()
