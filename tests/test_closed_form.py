"""The closed-form training path against plain autodiff (``fused=False``) for
every Keras feature and their combinations, with and without the CPU kernels,
plus its deterministic costs (bytes moved, residuals) for every feature."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import cpu_kernels, modes
from jaxbn.traffic import bytes_moved
from tests.combinations import pairwise

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True


def _adjustment(shape, key):
  return (jax.random.uniform(key, shape[-1:], minval=0.9, maxval=1.1),
          jax.random.uniform(jax.random.fold_in(key, 1), shape[-1:],
                             minval=-0.1, maxval=0.1))


FEATURES = {
    "plain": {},
    "renorm": dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7,
                                                 "dmax": 0.2}),
    "ghost": dict(virtual_batch_size=8),
    "ghost contiguous": dict(virtual_batch_size=8,
                             virtual_batch_layout="contiguous"),
    "ghost + renorm": dict(virtual_batch_size=8, renorm=True,
                           renorm_clipping={"rmax": 1.2, "dmax": 0.1}),
    "adjustment": dict(adjustment=_adjustment),
    "adjustment + renorm": dict(adjustment=_adjustment, renorm=True),
    "no scale, no center": dict(scale=False, center=False, renorm=True),
    "relu": dict(activation="relu"),
    "ghost + renorm + relu": dict(virtual_batch_size=8, renorm=True,
                                  activation="relu"),
}
LAYOUTS = {"NHWC": ((32, 5, 4, 6), -1), "NCHW": ((32, 6, 5, 4), 1),
           "axis list": ((32, 5, 4, 6), [2, 3]), "2-D": ((32, 7), -1)}
MASKS = {"none": None, "rows": "rows", "elements": "elements"}


def _mask(kind, shape, seed=3):
  if kind is None:
    return None
  rng = np.random.default_rng(seed)
  if kind == "rows":
    m = rng.random((shape[0],) + (1,) * (len(shape) - 1)) > 0.3
  else:
    m = rng.random(shape) > 0.3
  m.flat[0] = True
  return jnp.asarray(m)


def _step(config, params, state, x, dy, mask):
  key = jax.random.PRNGKey(7)

  def f(params, x):
    y, new_state = jaxbn.apply(config, params, state, x, training=True,
                               key=key, mask=mask)
    return y, new_state

  (y, new_state), vjp = jax.vjp(f, params, x)
  zero_state = jax.tree.map(jnp.zeros_like, new_state)
  return y, new_state, vjp((dy, zero_state))


def _random_state(state, seed=5):
  rng = np.random.default_rng(seed)
  return {k: (v if v.dtype != jnp.float32 else
              jnp.asarray(np.abs(rng.normal(1, 0.3, v.shape)), jnp.float32))
          for k, v in state.items()}


@pytest.mark.parametrize("feature,layout,mask",
                         pairwise(FEATURES, LAYOUTS, MASKS))
def test_closed_form_equals_autodiff(feature, layout, mask):
  # One program computes the autodiff reference (fused=False, XLA only) and
  # the closed form with the kernels on and off (one compilation per case).
  shape, axis = LAYOUTS[layout]
  arguments = dict(FEATURES[feature], axis=axis, momentum=0.8)
  if "adjustment" in arguments and layout != "NHWC":
    arguments["adjustment"] = lambda s, k: (1.05, 0.1)  # scalars broadcast
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3, 2, shape), jnp.float32)
  dy = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
  m = _mask(MASKS[mask], shape)
  paths = {"autodiff": (False, "off"), "kernels on": (None, "on"),
           "kernels off": (None, "off")}
  configs = {name: jaxbn.BatchNormConfig(
      fused=fused, moving_variance_estimator="biased", **arguments)
             for name, (fused, _) in paths.items()}
  params, state = jaxbn.init(configs["autodiff"], shape,
                             key=jax.random.PRNGKey(1))
  params = jax.tree.map(lambda v: v * 1.3 + 0.2, params)
  state = _random_state(state)

  def every_path(p, s, x, dy):
    results = {}
    for name, (_, kernels) in paths.items():
      with cpu_kernels.use(kernels):
        results[name] = _step(configs[name], p, s, x, dy, m)
    return results

  lowered = jax.jit(every_path).lower(params, state, x, dy)
  kernel_applies = cpu_kernels.available() and mask != "elements"
  # only the "kernels on" path calls the kernel, once
  assert lowered.as_text().count("@jaxbn_backward") == int(kernel_applies)
  results = lowered.compile()(params, state, x, dy)
  reference = results["autodiff"]
  for name in ("kernels on", "kernels off"):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results[name]),
                            jax.tree_util.tree_leaves(reference)):
      # sums of terms of either sign: absolute to the array's scale
      scale = float(np.max(np.abs(b), initial=1.0))
      np.testing.assert_allclose(
          a, b, rtol=2e-5, atol=2e-5 * scale,
          err_msg=f"{name}: {jax.tree_util.keystr(path)}")


# the features whose arithmetic the guard touches (renorm's corrections,
# merges over virtual batches, the ReLU's gate), and a mask
@pytest.mark.parametrize("feature,mask", [
    ("plain", "none"), ("renorm", "none"), ("ghost", "none"),
    ("ghost contiguous", "none"), ("relu", "none"),
    ("ghost + renorm + relu", "rows")])
def test_the_overflow_guard_changes_no_number_of_ordinary_data(feature, mask):
  # This module runs with the guard off (ORDINARY_DATA): here one program
  # per case computes every path with it on and off, which must agree to
  # float32 rounding (outputs, state, all gradients: the guard's ops are
  # exact for unit 1, but XLA may fuse the two programs differently), so
  # the rest of the module tests the numbers of the default program too.
  shape = (32, 5, 4, 6)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(3, 2, shape), jnp.float32)
  dy = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
  m = _mask(MASKS[mask], shape)
  paths = {"kernels": (None, "on", "auto"), "xla": (None, "off", "auto"),
           "accelerator": (None, "off", "accelerator"),
           "autodiff": (False, "off", "auto")}
  configs = {name: jaxbn.BatchNormConfig(fused=fused, momentum=0.8,
                                         **FEATURES[feature])
             for name, (fused, _, _) in paths.items()}
  params, state = jaxbn.init(configs["xla"], shape, key=jax.random.PRNGKey(1))
  state = _random_state(state)

  def every_path(p, s, x, dy):
    results = {}
    for name, (_, kernels, statistics) in paths.items():
      for guard in ("on", "off"):
        with cpu_kernels.use(kernels), modes.statistics(statistics), \
            modes.overflow_guard(guard):
          results[name, guard] = _step(configs[name], p, s, x, dy, m)
    return results

  results = jax.jit(every_path)(params, state, x, dy)
  for name in paths:
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(results[name, "on"]),
        jax.tree_util.tree_leaves(results[name, "off"])):
      scale = float(np.max(np.abs(b), initial=1.0))
      np.testing.assert_allclose(
          a, b, rtol=1e-6, atol=1e-6 * scale,
          err_msg=f"{name}: {jax.tree_util.keystr(path)}")


def test_closed_form_equals_autodiff_across_devices():
  # every feature under shard_map over 4 devices, sharded batch, per-row mask
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  shape = (32, 4, 3, 6)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(-2, 3, shape), jnp.float32)
  dy = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
  m = _mask("rows", shape)
  for feature in ("plain", "renorm", "ghost", "ghost + renorm", "adjustment",
                  "relu"):
    results = {}
    for fused in (None, False):
      config = jaxbn.BatchNormConfig(fused=fused, momentum=0.8,
                                     moving_variance_estimator="biased",
                                     **FEATURES[feature])
      params, state = jaxbn.init(config, shape)
      state = _random_state(state)

      def local(p, s, x, dy, m, config=config):
        def f(p, x):
          return jaxbn.apply(config, p, s, x, training=True,
                             key=jax.random.PRNGKey(7), mask=m,
                             axis_name="data")
        (y, new_state), vjp = jax.vjp(f, p, x)
        grads = vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))
        return y, new_state, grads

      step = jax.jit(jax.shard_map(
          local, mesh=mesh,
          in_specs=(P(), P(), P("data"), P("data"), P("data")),
          out_specs=(P("data"), P(), (P(), P("data")))))
      results[fused] = step(params, state, x, dy, m)
    for a, b in zip(jax.tree_util.tree_leaves(results[None]),
                    jax.tree_util.tree_leaves(results[False])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=feature)


BYTES_FEATURES = {
    "plain": ({}, None),
    "renorm": (FEATURES["renorm"], None),
    "ghost": (dict(virtual_batch_size=8), None),
    "ghost contiguous": (FEATURES["ghost contiguous"], None),
    "mask": ({}, "rows"),
    "adjustment": (dict(adjustment=_adjustment), None),
    "axis list": (dict(axis=[2, 3]), None),
    "relu": (dict(activation="relu"), None),
    # 3200 channels a row: the output pass is a kernel (WIDE_ROW_CHANNELS)
    "wide rows": (dict(axis=[1, 2], activation="relu"), None, (512, 4, 800)),
}


@pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels")
@pytest.mark.parametrize("feature", list(BYTES_FEATURES))
def test_every_feature_moves_the_plain_paths_bytes_and_saves_only_x(feature):
  """Forward+backward with the kernels: one read for the statistics, a read
  and a write for y, the backward in one call (two reads each of dy and x,
  one write): 8x the input, no full-size temporary, only x saved."""
  arguments, mask_kind, *shape = BYTES_FEATURES[feature]
  shape = shape[0] if shape else (32, 16, 16, 32)
  config = jaxbn.BatchNormConfig(**arguments)
  params, state = jaxbn.init(config, shape)
  x = jnp.ones(shape, jnp.float32)
  m = _mask(mask_kind, shape)
  key = jax.random.PRNGKey(0)
  f = lambda p, x: jaxbn.apply(config, p, state, x, training=True, key=key,
                               mask=m)[0]

  def step(params, x, dy):
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(dy)

  with cpu_kernels.use("on"):
    with modes.overflow_guard("on"):  # the real program (module: off)
      compiled = jax.jit(step).lower(params, x, x).compile()
    with modes.overflow_guard("off"):  # the program ordinary data run
      ordinary = jax.jit(step).lower(params, x, x).compile()
    _, vjp_fn = jax.vjp(f, params, x)
  assert ("jaxbn_normalize" in ordinary.as_text()) == (feature == "wide rows")
  # a mask adds its per-row weights: built once, read by both kernel calls
  mask_rows = 0 if m is None else 4 * x.nbytes // (4 * shape[-1])
  assert bytes_moved(ordinary) <= 8.1 * x.nbytes + 4 * mask_rows
  assert ordinary.memory_analysis().temp_size_in_bytes <= 0.05 * x.nbytes
  # nor does the real one: the guard's retake (XLA, a cond's branch) and the
  # backward in units add nothing x-sized
  assert compiled.memory_analysis().temp_size_in_bytes <= 0.05 * x.nbytes
  saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_fn)
              if hasattr(leaf, "nbytes"))
  assert saved - x.nbytes <= 0.05 * x.nbytes


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_masked_out_values_never_reach_the_statistics(kernels):
  # NaN/Inf padding in masked-out rows: the state and the valid outputs are
  # those of the valid rows alone (the padded outputs are still normalized,
  # and their cotangents reach the parameters as for any output)
  shape = (12, 3, 4)
  rng = np.random.default_rng(9)
  x = rng.normal(1, 2, shape).astype(np.float32)
  keep = np.array([True] * 8 + [False] * 4)
  poisoned = x.copy()
  poisoned[~keep] = np.nan
  poisoned[-1] = np.inf
  config = jaxbn.BatchNormConfig(momentum=0.5, renorm=True)
  params, state = jaxbn.init(config, shape)
  apply = jax.jit(lambda x, m: jaxbn.apply(config, params, state, x,
                                           training=True, mask=m))
  with cpu_kernels.use(kernels):
    y, new_state = apply(jnp.asarray(poisoned), jnp.asarray(keep[:, None, None]))
    y_ref, state_ref = apply(jnp.asarray(x[keep]), None)
  for name in new_state:
    np.testing.assert_allclose(new_state[name], state_ref[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(y)[keep], y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature", ["renorm", "ghost", "adjustment", "relu"])
def test_grad_of_grad_through_every_feature(feature):
  shape = (8, 3, 5)
  x = jnp.asarray(np.random.default_rng(4).normal(0, 1, shape), jnp.float32)
  outs = {}
  for fused in (None, False):
    config = jaxbn.BatchNormConfig(fused=fused, **FEATURES[feature])
    params, state = jaxbn.init(config, shape)
    loss = lambda x: jnp.sum(jnp.sin(jaxbn.apply(
        config, params, state, x, training=True,
        key=jax.random.PRNGKey(0))[0]))
    outs[fused] = jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2)))(x)
  np.testing.assert_allclose(outs[None], outs[False], rtol=2e-4, atol=2e-5)


def test_features_combine_under_vmap_with_kernels():
  shape = (3, 8, 4, 5)
  x = jnp.asarray(np.random.default_rng(6).normal(0, 1, shape), jnp.float32)
  for arguments in (FEATURES["ghost"], FEATURES["renorm"]):
    outs = {}
    for fused, kernels in itertools.product((None, False), ("on",)):
      config = jaxbn.BatchNormConfig(fused=fused, axis=1, **arguments)
      params, state = jaxbn.init(config, shape[1:])
      f = lambda x: jaxbn.apply(config, params, state, x, training=True)[0]
      with cpu_kernels.use(kernels):
        outs[fused] = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(f(x) ** 3))))(x)
    np.testing.assert_allclose(outs[None], outs[False], rtol=1e-4, atol=1e-5)
