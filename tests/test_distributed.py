"""Cross-device statistics on 8 simulated CPU devices.

Reference: one device normalizing the whole batch (masked rows carry a zero
cotangent, so the losses agree), or only the valid rows where stated.
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import cpu_kernels

N_DEV = 8
pytestmark = [pytest.mark.skipif(jax.device_count() < N_DEV,
                                 reason="needs 8 (simulated) devices"),
              # under both statistics algorithms (see conftest)
              pytest.mark.usefixtures("statistics_mode")]


def _mesh(shape=(N_DEV,), names=("data",)):
  return Mesh(np.array(jax.devices()[:N_DEV]).reshape(shape), names)


def _problem(rows=32, channels=4, seed=0, mean=1.0, empty_device=True):
  rng = np.random.RandomState(seed)
  x = (rng.randn(rows, channels) * 3 + mean).astype(np.float32)
  mask = rng.rand(rows, 1) > 0.3
  if empty_device:
    mask[: rows // N_DEV] = False  # device 0 holds no valid row
  dy = (rng.randn(rows, channels) * mask).astype(np.float32)
  return x, mask, dy


def _params(config, shape):
  params, state = jaxbn.init(config, shape)
  params = {"gamma": params["gamma"] * 1.3, "beta": params["beta"] + 0.2}
  state = {k: v + 0.1 for k, v in state.items()}
  return params, state


@functools.lru_cache(maxsize=None)  # one jit per configuration: its cache
def _sharded_step(config, mesh, axis_name="data", spec=P("data")):
  def local(params, state, x, mask, dy):
    def f(params, x):
      y, s = jaxbn.apply(config, params, state, x, training=True,
                         axis_name=axis_name, mask=mask)
      return jax.lax.psum(jnp.sum(y * dy), axis_name), (y, s)
    (_, (y, s)), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        params, x)
    return y, s, g
  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), spec, spec, spec),
      out_specs=(spec, P(), (P(), spec))))


@functools.partial(jax.jit, static_argnums=0)
def _single_step(config, params, state, x, mask, dy):
  def f(params, x):
    y, s = jaxbn.apply(config, params, state, x, training=True, mask=mask)
    return jnp.sum(y * dy), (y, s)
  (_, (y, s)), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      params, x)
  return y, s, g


@pytest.mark.parametrize("kwargs", [{}, {"fused": False},
                                    {"renorm": True,
                                     "renorm_clipping": {"rmax": 1.5}}],
                         ids=str)
def test_uneven_masked_shards_equal_one_device(kwargs):
  config = jaxbn.BatchNormConfig(momentum=0.5, **kwargs)
  x, mask, dy = _problem()
  params, state = _params(config, x.shape)
  y, s, (gp, gx) = _sharded_step(config, _mesh())(params, state, x, mask, dy)
  keep = mask[:, 0]
  # one device normalizing only the valid rows
  y_ref, s_ref, (gp_ref, gx_ref) = _single_step(
      jaxbn.BatchNormConfig(momentum=0.5, **kwargs), params, state, x[keep],
      None, dy[keep])
  np.testing.assert_allclose(np.asarray(y)[keep], y_ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gx)[keep], gx_ref, atol=1e-5)
  for k in gp:
    np.testing.assert_allclose(gp[k], gp_ref[k], atol=1e-5, err_msg=k)
  for k in s_ref:
    np.testing.assert_allclose(s[k], s_ref[k], atol=1e-5, err_msg=k)
  # and one device with the same mask over the whole batch
  y_all, _, (_, gx_all) = _single_step(config, params, state, x, mask, dy)
  np.testing.assert_allclose(y, y_all, atol=1e-5)
  np.testing.assert_allclose(gx, gx_all, atol=1e-5)


def test_no_valid_element_anywhere_keeps_the_state_and_stays_finite():
  config = jaxbn.BatchNormConfig(momentum=0.5)
  x, mask, dy = _problem()
  params, state = _params(config, x.shape)
  none = np.zeros_like(mask)
  y, s, (gp, gx) = _sharded_step(config, _mesh())(params, state, x, none, dy)
  for leaf in jax.tree_util.tree_leaves((y, gp, gx)):
    assert np.all(np.isfinite(leaf))
  for k in state:
    np.testing.assert_array_equal(s[k], state[k])


def test_large_mean_statistics_are_exact_across_devices():
  config = jaxbn.BatchNormConfig(momentum=0.0, fused=False,
                                 moving_variance_estimator="biased")
  rng = np.random.RandomState(1)
  x = (rng.randn(64, 3) + 1e4).astype(np.float32)
  x[:8] += 3.0  # devices differ
  params, state = jaxbn.init(config, x.shape)
  for fused in (None, False):
    cfg = jaxbn.BatchNormConfig(momentum=0.0, fused=fused,
                                moving_variance_estimator="biased")
    f = jax.jit(jax.shard_map(
        lambda x: jaxbn.apply(cfg, params, state, x, training=True,
                              axis_name="data")[1],
        mesh=_mesh(), in_specs=P("data"), out_specs=P()))
    var = np.asarray(f(x)["moving_variance"])
    true = np.asarray(x, np.float64).var(0)
    np.testing.assert_allclose(var, true, rtol=2e-3)
  del config


def _count(hlo, op="all-reduce"):
  return hlo.count(f" {op}(") + hlo.count(f" {op}-start(")


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("fused", [None, False])
def test_forward_has_exactly_one_all_reduce_per_layer(layers, fused):
  config = jaxbn.BatchNormConfig(fused=fused)
  x, mask, _ = _problem()
  params, state = jaxbn.init(config, x.shape)

  def forward(x, mask):
    for _ in range(layers):
      x, _ = jaxbn.apply(config, params, state, x, training=True,
                         axis_name="data", mask=mask)
      x = jnp.tanh(x)
    return x

  f = jax.jit(jax.shard_map(forward, mesh=_mesh(),
                            in_specs=(P("data"), P("data")),
                            out_specs=P("data")))
  hlo = f.lower(x, mask).compile().as_text()
  assert _count(hlo) == layers


def test_fused_backward_adds_one_all_reduce_per_layer():
  config = jaxbn.BatchNormConfig()
  x, mask, dy = _problem()
  params, state = jaxbn.init(config, x.shape)

  def loss(params, x, mask, dy):
    y, _ = jaxbn.apply(config, params, state, x, training=True,
                       axis_name="data", mask=mask)
    return jnp.sum(y * dy)

  grad = jax.shard_map(jax.grad(loss, argnums=1), mesh=_mesh(),
                       in_specs=(P(), P("data"), P("data"), P("data")),
                       out_specs=P("data"))
  hlo = jax.jit(grad).lower(params, x, mask, dy).compile().as_text()
  assert _count(hlo) == 2


def test_pmap_with_axis_index_groups_gives_group_statistics():
  config = jaxbn.BatchNormConfig(momentum=0.5)
  x, mask, _ = _problem(empty_device=False)
  params, state = _params(config, x.shape)
  groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
  y, s = jax.pmap(lambda x, m: jaxbn.apply(
      config, params, state, x, training=True, axis_name="d", mask=m,
      axis_index_groups=groups), axis_name="d")(
          x.reshape(N_DEV, -1, 4), mask.reshape(N_DEV, -1, 1))
  for g, group in enumerate(groups):
    rows = np.concatenate([np.arange(d * 4, d * 4 + 4) for d in group])
    y_ref, s_ref = jaxbn.apply(config, params, state, x[rows], training=True,
                               mask=mask[rows])
    np.testing.assert_allclose(np.asarray(y).reshape(32, 4)[rows], y_ref,
                               atol=1e-5)
    np.testing.assert_allclose(s["moving_variance"][group[0]],
                               s_ref["moving_variance"], atol=1e-5)


def test_sub_groups_with_a_two_axis_mesh_and_tuple_axis_names():
  config = jaxbn.BatchNormConfig(momentum=0.5)
  x, mask, dy = _problem(empty_device=False)
  params, state = _params(config, x.shape)
  mesh = _mesh((2, 4), ("replica", "group"))
  spec = P(("replica", "group"))
  # statistics over 'group' only: two groups of 4 devices (16 rows each)
  f = jax.jit(jax.shard_map(
      lambda x, m: jaxbn.apply(config, params, state, x, training=True,
                               axis_name="group", mask=m)[0],
      mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  y = np.asarray(f(x, mask))
  for half in (slice(0, 16), slice(16, 32)):
    y_ref, _ = jaxbn.apply(config, params, state, x[half], training=True,
                           mask=mask[half])
    np.testing.assert_allclose(y[half], y_ref, atol=1e-5)
  # a tuple of names combines over both axes: the whole batch
  y_all, s_all, _ = _sharded_step(config, mesh, ("replica", "group"), spec)(
      params, state, x, mask, dy)
  y_ref, s_ref = jaxbn.apply(config, params, state, x, training=True,
                             mask=mask)
  np.testing.assert_allclose(y_all, y_ref, atol=1e-5)
  np.testing.assert_allclose(s_all["moving_mean"], s_ref["moving_mean"],
                             atol=1e-5)


def test_ghost_batches_stay_local_and_moving_statistics_average():
  config = jaxbn.BatchNormConfig(momentum=0.5, virtual_batch_size=4)
  x, _, _ = _problem(rows=128, empty_device=False)
  params, state = _params(config, x.shape)
  f = jax.jit(jax.shard_map(
      lambda x: jaxbn.apply(config, params, state, x, training=True,
                            axis_name="data"),
      mesh=_mesh(), in_specs=P("data"), out_specs=(P("data"), P())))
  y, s = f(x)
  shards = np.split(x, N_DEV)
  refs = [jaxbn.apply(config, params, state, shard, training=True)
          for shard in shards]
  np.testing.assert_allclose(y, np.concatenate([r[0] for r in refs]),
                             atol=1e-5)
  for k in ("moving_mean", "moving_variance"):
    np.testing.assert_allclose(s[k], np.mean([r[1][k] for r in refs], 0),
                               atol=1e-5)


def test_sharded_jit_without_axis_name_gives_global_statistics():
  config = jaxbn.BatchNormConfig(momentum=0.5)
  x, mask, _ = _problem(empty_device=False)
  params, state = _params(config, x.shape)
  sharding = NamedSharding(_mesh(), P("data"))
  xs = jax.device_put(x, sharding)
  ms = jax.device_put(mask, sharding)
  step = jax.jit(lambda x, m: jaxbn.apply(config, params, state, x,
                                          training=True, mask=m))
  y, s = step(xs, ms)
  assert len(y.sharding.device_set) == N_DEV
  y_ref, s_ref = jaxbn.apply(config, params, state, x, training=True,
                             mask=mask)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_allclose(s["moving_variance"], s_ref["moving_variance"],
                             atol=1e-5)


def test_apply_local_gives_per_device_statistics_under_jit():
  config = jaxbn.BatchNormConfig(momentum=0.5)
  x, _, _ = _problem(empty_device=False)
  params, state = _params(config, x.shape)
  step = jax.jit(lambda x: jaxbn.apply_local(config, params, state, x,
                                             mesh=_mesh(), training=True))
  y, s = step(x)
  refs = [jaxbn.apply(config, params, state, shard, training=True)
          for shard in np.split(x, N_DEV)]
  np.testing.assert_allclose(y, np.concatenate([r[0] for r in refs]),
                             atol=1e-5)
  np.testing.assert_allclose(
      s["moving_mean"], np.mean([r[1]["moving_mean"] for r in refs], 0),
      atol=1e-6)


def test_linen_layer_with_axis_name_under_shard_map():
  layer = jaxbn.BatchNormalization(momentum=0.5, axis_name="data")
  x, mask, _ = _problem(empty_device=False)
  variables = layer.init(jax.random.PRNGKey(0), x)  # outside shard_map
  f = jax.jit(jax.shard_map(
      lambda v, x: layer.apply(v, x, training=True,
                               mutable=["batch_stats"]),
      mesh=_mesh(), in_specs=(P(), P("data")),
      out_specs=(P("data"), P())))
  y, updates = f(variables, x)
  y_ref, s_ref = jaxbn.apply(jaxbn.BatchNormConfig(momentum=0.5),
                             variables["params"], variables["batch_stats"],
                             x, training=True)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["moving_variance"],
                             s_ref["moving_variance"], atol=1e-5)


def test_local_statistics_in_shard_map_sum_parameter_gradients():
  # No axis_name: each device normalizes alone; replicated params still get
  # the gradient summed over devices, on the fast path as by autodiff.
  x, mask, dy = _problem(empty_device=False)
  results = []
  for fused in (None, False):
    config = jaxbn.BatchNormConfig(fused=fused)
    params, state = _params(config, x.shape)

    def local(params, x, dy):
      def f(params, x):
        y, _ = jaxbn.apply(config, params, state, x, training=True)
        return jax.lax.psum(jnp.sum(y * dy), "data")
      return jax.grad(f, argnums=(0, 1))(params, x)

    results.append(jax.jit(jax.shard_map(
        local, mesh=_mesh(), in_specs=(P(), P("data"), P("data")),
        out_specs=(P(), P("data"))))(params, x, dy))
  for a, b in zip(jax.tree_util.tree_leaves(results[0]),
                  jax.tree_util.tree_leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


from hypothesis import given, settings, strategies as st  # noqa: E402


# Ordinary data: the guard's ordinary program on devices is checked by the
# tests above; here its cond would only double twenty compiles.
@pytest.mark.ordinary_data
@settings(max_examples=10, deadline=None)
# shapes from a few values (each new shape is two more compiles); the data,
# the mask's density and the path vary freely
@given(rows_per_device=st.sampled_from([1, 3]),
       channels=st.sampled_from([1, 5]),
       keep=st.floats(0.0, 1.0), seed=st.integers(0, 1000),
       fused=st.sampled_from([None, False]))
def test_sync_bn_on_devices_equals_one_device_property(rows_per_device,
                                                       channels, keep, seed,
                                                       fused):
  rng = np.random.RandomState(seed)
  rows = rows_per_device * N_DEV
  x = (rng.randn(rows, channels) * rng.uniform(0.5, 3)
       + rng.uniform(-5, 5)).astype(np.float32)
  mask = rng.rand(rows, 1) < keep
  dy = (rng.randn(rows, channels) * mask).astype(np.float32)
  config = jaxbn.BatchNormConfig(momentum=0.5, fused=fused)
  params, state = _params(config, x.shape)
  y, s, (gp, gx) = _sharded_step(config, _mesh())(params, state, x, mask, dy)
  y_ref, s_ref, (gp_ref, gx_ref) = _single_step(config, params, state, x,
                                                mask, dy)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(gx, gx_ref, atol=2e-5, rtol=2e-5)
  for k in s_ref:
    np.testing.assert_allclose(s[k], s_ref[k], atol=2e-5, rtol=2e-5)
  for k in gp_ref:
    np.testing.assert_allclose(gp[k], gp_ref[k], atol=1e-4, rtol=1e-4)


def _reduced_mesh_axis_sizes(hlo, dtype):
  """For each all-reduce of ``dtype`` values in compiled HLO text, the size of
  the mesh axis (or axes) it reduces over."""
  sizes = []
  for line in hlo.splitlines():
    result = re.search(r"= (.*?) all-reduce\(", line)  # one type or a tuple
    if result is None or f"{dtype}[" not in result.group(1):
      continue
    axes = dict(re.findall(r"'(axis_\d+)'=(\d+)", line))
    reduced = re.search(r"\] \{([^}]*)\}", line).group(1)
    sizes.append(math.prod(int(axes[a.strip("' ")])
                           for a in reduced.split(",")))
  return sizes


def test_linen_partition_names_on_a_data_model_mesh():
  # channels sharded over `model`, the batch over `data` (sharded jit): the
  # variables carry their partition names, the statistics equal one
  # device's, and every all-reduce of the statistics runs over `data` alone
  import flax.linen as nn
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  layer = jaxbn.BatchNormalization(momentum=0.9, partition_names=("model",))
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 32)) * 3 + 1
  variables = layer.init(jax.random.PRNGKey(1), x)
  specs = nn.get_partition_spec(variables)
  assert jax.tree.leaves(specs) == [P("model")] * 4
  plain = jax.tree.map(lambda v: v, nn.unbox(variables))

  def step(variables, x):
    return layer.apply(variables, x, training=True, mutable=["batch_stats"])

  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, None,
                                                      "model")))
  with cpu_kernels.use("auto"):  # several devices: XLA
    compiled = jax.jit(step).lower(jax.device_put(variables, shardings),
                                   x_sharded).compile()
    y, updates = compiled(jax.device_put(variables, shardings), x_sharded)
    want_y, want_updates = step(plain, x)
  np.testing.assert_allclose(y, want_y, atol=2e-6)
  for got, want in zip(jax.tree.leaves(nn.unbox(updates)),
                       jax.tree.leaves(want_updates)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert set(_reduced_mesh_axis_sizes(compiled.as_text(), "f32")) == {2}
  with pytest.raises(ValueError, match="partition_names"):
    jaxbn.BatchNormalization(partition_names=("data", "model")).init(
        jax.random.PRNGKey(1), x)


def test_statistics_over_data_in_one_all_reduce_with_channels_over_model():
  # shard_map over `data` alone (XLA keeps sharding the channels over
  # `model`) with axis_name='data': the statistics equal one device's, in
  # one all-reduce over `data` and no collective over `model` (on CPU too:
  # the guard takes its branch-free form where a mesh axis is automatic)
  import flax.linen as nn
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  layer = jaxbn.BatchNormalization(momentum=0.9, partition_names=("model",),
                                   axis_name="data")
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 32)) * 3 + 1
  x = x.at[:, :, :, 5].multiply(1e25)  # a channel the guard puts in units
  variables = layer.init(jax.random.PRNGKey(1), x)
  specs = nn.get_partition_spec(variables)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

  def step(variables, x):
    return layer.apply(variables, x, training=True, mutable=["batch_stats"])

  step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")),
                       out_specs=(P("data"), P()), axis_names={"data"})
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, None,
                                                      "model")))
  with cpu_kernels.use("auto"):
    compiled = jax.jit(step).lower(jax.device_put(variables, shardings),
                                   x_sharded).compile()
    y, updates = compiled(jax.device_put(variables, shardings), x_sharded)
  one_device = jaxbn.BatchNormalization(momentum=0.9)
  want_y, want_updates = one_device.apply(nn.unbox(variables), x,
                                          training=True,
                                          mutable=["batch_stats"])
  np.testing.assert_allclose(y, want_y, atol=2e-5)
  for got, want in zip(jax.tree.leaves(nn.unbox(updates)),
                       jax.tree.leaves(want_updates)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  hlo = compiled.as_text()
  [line] = [line for line in hlo.splitlines() if " all-reduce(" in line]
  groups = re.search(r"replica_groups=\{(\{[^=]*\})\}", line).group(1)
  # devices (data, model) = divmod(id, 4): each group is one `model` index
  assert groups == "{0,4},{1,5},{2,6},{3,7}", line
  for collective in ("all-gather(", "collective-permute(", "all-to-all("):
    assert collective not in hlo


@pytest.mark.parametrize("padding", [0.0, np.nan])
def test_a_sequence_mask_on_a_mesh_with_automatic_axes_holds_no_input_copy(
    padding):
  # a (batch, time) mask with x sharded by XLA over `data` and `model`: the
  # masked sums take the mask as a product, as on one device (a select there
  # is written out in full: 4x a float32 shard), and a NaN in padding is
  # retaken in the cond, whose predicate over the channels costs one scalar
  # collective; the statistics are the valid positions'
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  config = jaxbn.BatchNormConfig()
  shape = (16, 32, 256)
  params, state = jaxbn.init(config, shape)
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 1
  mask = jax.random.uniform(jax.random.PRNGKey(1), shape[:2]) > 0.3
  x = jnp.where(mask[..., None], x, padding)

  def step(x, mask):
    return jaxbn.apply(config, params, state, x, training=True, mask=mask)[1]

  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
  mask_sharded = jax.device_put(mask, NamedSharding(mesh, P("data")))
  with cpu_kernels.use("auto"), jax.set_mesh(mesh):  # several devices: XLA
    compiled = jax.jit(step).lower(x_sharded, mask_sharded).compile()
    new_state = compiled(x_sharded, mask_sharded)
  valid = np.asarray(x)[np.asarray(mask)]
  want = jaxbn.apply(config, params, state, jnp.asarray(valid),
                     training=True)[1]
  for name in new_state:
    np.testing.assert_allclose(new_state[name], want[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  # per-channel and mask-sized buffers only (a shard of x is 8 x 32 x 64)
  shard_bytes = x.nbytes / 8
  assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * shard_bytes


def test_a_sequence_mask_in_a_shard_map_over_data_beside_automatic_model():
  # shard_map manual over `data` only (axis_names), `model` left to XLA: the
  # mask's shift search traces where the mask varies along `data`, and the
  # statistics and outputs are one device's over the valid positions
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, (8, 16, 6))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 6)) * 3 + 2
  mask = jax.random.uniform(jax.random.PRNGKey(1), (8, 16)) > 0.3

  def step(x, mask):
    return jaxbn.apply(config, params, state, x, training=True, mask=mask,
                       axis_name="data")

  with jax.set_mesh(mesh):
    y, new_state = jax.jit(jax.shard_map(
        step, in_specs=(P("data"), P("data")),
        out_specs=(P("data"), P()), axis_names={"data"}))(x, mask)
  want_y, want_state = jaxbn.apply(config, params, state, x, training=True,
                                   mask=mask)
  valid = np.asarray(mask)[..., None]
  np.testing.assert_allclose(np.where(valid, y, 0), np.where(valid, want_y, 0),
                             rtol=1e-5, atol=1e-5)
  for name in new_state:
    np.testing.assert_allclose(new_state[name], want_state[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)


def test_nnx_partition_names_shard_the_variables_over_model():
  from flax import nnx
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 32)) * 3 + 1
  with jax.set_mesh(mesh):
    layer = jaxbn.nnx.BatchNormalization(32, momentum=0.9,
                                         partition_names=("model",),
                                         rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert set(jax.tree.leaves(specs)) == {P("model")}
  assert layer.gamma[...].sharding.spec == P("model")
  reference = jaxbn.nnx.BatchNormalization(32, momentum=0.9, rngs=nnx.Rngs(0))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, None,
                                                      "model")))
  with cpu_kernels.use("auto"), jax.set_mesh(mesh):
    y = nnx.jit(lambda m, x: m(x, training=True))(layer, x_sharded)
  want = reference(x, training=True)
  np.testing.assert_allclose(y, want, atol=2e-6)
  np.testing.assert_allclose(layer.moving_variance[...],
                             reference.moving_variance[...], rtol=1e-6)
  with pytest.raises(ValueError, match="partition_names"):
    jaxbn.nnx.BatchNormalization(32, partition_names=("data", "model"),
                                 rngs=nnx.Rngs(0))


def test_per_example_vmap_with_axis_name_equals_the_batch_in_little_memory():
  # Equinox's style: each example alone under vmap, statistics over the
  # vmapped axis. The members share one device: their statistics are
  # gathered, not summed in a members x members buffer (270 MB here).
  n, c = 256, 256
  config = jaxbn.BatchNormConfig()
  params, state = jaxbn.init(config, (1, c))
  x = jax.random.normal(jax.random.PRNGKey(0), (n, c)) * 3 + 2

  def per_example(x):
    y, new_state = jaxbn.apply(config, params, state, x[None], training=True,
                               axis_name="batch")
    return y[0], new_state

  step = jax.jit(jax.vmap(per_example, axis_name="batch", out_axes=(0, None)))
  compiled = step.lower(x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 8 * x.nbytes
  y, new_state = compiled(x)
  want_y, want_state = jaxbn.apply(config, params, state, x, training=True)
  np.testing.assert_allclose(y, want_y, atol=2e-6)
  for name in want_state:
    np.testing.assert_allclose(new_state[name], want_state[name], rtol=1e-6)

