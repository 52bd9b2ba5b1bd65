"""The Equinox layer: the functional core's numbers under eqx.filter_jit,
eqx.filter_grad, vmap over examples (Equinox's style), filter_vmap
ensembles and shard_map; and ``from_equinox`` keeping eqx.nn.BatchNorm's
numbers."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jaxbn
from jaxbn.equinox import BatchNormalization, from_equinox

ORDINARY_DATA = True


def _data(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * rng.uniform(0.5, 2, shape[-1]) + 1.5
  return jnp.asarray(x, jnp.float32)


def _functional(layer, stats, x, training, **kwargs):
  params = {n: v for n, v in (("gamma", layer.gamma), ("beta", layer.beta))
            if v is not None}
  return jaxbn.apply(layer.batch_config, params, stats, x,
                     training=training, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"momentum": 0.9},
    {"renorm": True, "virtual_batch_size": 4, "activation": "relu"},
    {"axis": [1, 3], "input_rank": 4},
])
def test_batched_calls_equal_the_functional_core(kwargs):
  kwargs = dict(kwargs)
  rank = kwargs.pop("input_rank", None)
  x = _data((8, 3, 3, 5))
  features = 5 if "axis" not in kwargs else (3, 5)
  layer, state = eqx.nn.make_with_state(BatchNormalization)(
      features, input_rank=rank, **kwargs)
  start = state.get(layer.state_index)

  @eqx.filter_jit
  def step(layer, state, x):
    def loss(layer):
      y, new_state = layer(x, state, training=True)
      return jnp.sum(jnp.sin(y)), new_state
    return eqx.filter_grad(loss, has_aux=True)(layer)

  grads, state = step(layer, state, x)
  want_grads, want_state = jax.grad(
      lambda p: (lambda out: (jnp.sum(jnp.sin(out[0])), out[1]))(
          jaxbn.apply(layer.batch_config, p, start, x, training=True)),
      has_aux=True)({"gamma": layer.gamma, "beta": layer.beta})
  np.testing.assert_allclose(grads.gamma, want_grads["gamma"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(grads.beta, want_grads["beta"], rtol=1e-5,
                             atol=1e-6)
  for name, value in want_state.items():
    np.testing.assert_allclose(state.get(layer.state_index)[name], value,
                               rtol=1e-6)
  inference = eqx.nn.inference_mode(layer)
  y, same = inference(x, state)
  want_y, _ = _functional(layer, state.get(layer.state_index), x, False)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
  assert same is state


def test_per_example_vmap_takes_statistics_over_the_vmapped_axis():
  # Equinox's style: (C, H, W) examples, channels first
  x = _data((16, 3, 3, 4)).transpose(0, 3, 1, 2)
  layer, state = eqx.nn.make_with_state(BatchNormalization)(
      4, axis=0, axis_name="batch", per_example=True, momentum=0.8)
  y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None),
                      out_axes=(0, None))(x, state)
  config = jaxbn.BatchNormConfig(axis=1, momentum=0.8)
  params, start = jaxbn.init(config, x.shape)
  want_y, want_state = jaxbn.apply(config, params, start, x, training=True)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for name, value in want_state.items():
    np.testing.assert_allclose(state.get(layer.state_index)[name], value,
                               rtol=1e-6)
  with pytest.raises(ValueError, match="axis_name"):
    BatchNormalization(4, per_example=True)


def test_filter_vmap_ensembles_keep_their_members_apart():
  keys = jax.random.split(jax.random.key(0), 3)
  init = {"class_name": "RandomNormal", "config": {"stddev": 0.5}}

  @eqx.filter_vmap
  def make(key):
    return eqx.nn.make_with_state(BatchNormalization)(
        5, gamma_initializer=init, key=key)

  layers, states = make(keys)
  xs = jnp.stack([_data((6, 5), seed=i) for i in range(3)])
  ys, states = eqx.filter_vmap(
      lambda layer, state, x: layer(x, state, training=True))(layers, states,
                                                             xs)
  for i in range(3):
    member = jax.tree.map(lambda v: v[i], eqx.filter(layers, eqx.is_array))
    layer = eqx.combine(member, eqx.filter(layers, eqx.is_array,
                                           inverse=True))
    stats = jax.tree.map(lambda v: v[i], states.get(layers.state_index))
    start = jax.tree.map(lambda v: v[i], make(keys)[1].get(
        layers.state_index))
    want_y, want_state = _functional(layer, start, xs[i], True)
    np.testing.assert_allclose(ys[i], want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["moving_variance"],
                               want_state["moving_variance"], rtol=1e-6)


def test_shard_map_with_axis_name_equals_one_device():
  mesh = Mesh(jax.devices()[:4], ("data",))
  x = _data((16, 6))
  layer, state = eqx.nn.make_with_state(BatchNormalization)(
      6, axis_name="data")
  start = state.get(layer.state_index)

  def step(layer, state, x):
    y, state = layer(x, state, training=True)
    return y, state

  y, state = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data")),
      out_specs=(P("data"), P())))(layer, state, x)
  want_y, want_state = _functional(layer, start, x, True)  # one device
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.get(layer.state_index)["moving_mean"],
                             want_state["moving_mean"], rtol=1e-5)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_from_equinox_keeps_the_numbers_of_eqx_batch_norm(mode):
  x = _data((16, 3, 3, 4)).transpose(0, 3, 1, 2)
  bn, bn_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
      4, axis_name="batch", momentum=0.7, eps=1e-4, mode=mode)
  bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn,
                   (jnp.linspace(0.5, 2, 4), jnp.linspace(-1, 1, 4)))
  run = jax.vmap(lambda m, x, s: m(x, s), axis_name="batch",
                 in_axes=(None, 0, None), out_axes=(0, None))
  layer, state = from_equinox(bn, bn_state)  # before any training step
  inference = lambda m, s, x: jax.vmap(lambda x: m(x, s)[0])(x)
  for step in range(3):
    y_eqx, bn_state = run(bn, x * (1 + step), bn_state)
    if mode == "batch":  # jaxbn trains as Equinox's 'batch' mode
      y, state = run(layer, x * (1 + step), state)
      np.testing.assert_allclose(y, y_eqx, rtol=1e-5, atol=1e-5)
  layer, state = from_equinox(bn, bn_state)
  np.testing.assert_allclose(
      inference(eqx.nn.inference_mode(layer), state, x),
      inference(eqx.nn.inference_mode(bn), bn_state, x), rtol=1e-5,
      atol=1e-5)
  with pytest.raises(TypeError, match="eqx.nn.BatchNorm"):
    from_equinox(layer, state)
  assert jaxbn.from_equinox is from_equinox
