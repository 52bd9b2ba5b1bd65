"""Existing Flax models, unchanged, with their batch norms run through jaxbn:
``jaxbn.linen.replace_batch_norm`` and ``jaxbn.nnx.replace_batch_norm`` give a
ResNet written as the model zoos write it (``flax.linen.BatchNorm``,
``nnx.BatchNorm``) the numbers it has without them, on its own variables."""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn

ORDINARY_DATA = True


class ResNetBlock(nn.Module):
  """As flax's example ResNet (and most zoos) writes it."""

  filters: int
  norm: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                         name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int] = (1, 1)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5)
    x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(8 * 2 ** i, norm, strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _images(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, 8, 8, 3)) * 2 + 0.5, jnp.float32)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def test_a_linen_resnet_gets_the_same_numbers_through_jaxbn():
  model = ResNet()
  x = _images()
  variables = model.init(jax.random.key(0), x, train=False)
  with jaxbn.linen.replace_batch_norm():
    ours = model.init(jax.random.key(0), x, train=False)
  _assert_trees_close(ours, variables, rtol=0, atol=0)  # same variables

  def train_step(variables, x):
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, x,
                                    mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits)), (logits, updates)
    return jax.grad(loss, has_aux=True)(variables["params"])

  want = jax.jit(train_step)(variables, x)
  with jaxbn.linen.replace_batch_norm():
    got = jax.jit(train_step)(variables, x)
  _assert_trees_close(got, want)
  # inference with the updated statistics, and a second step from them
  stats = want[1][1]["batch_stats"]
  trained = {**variables, "batch_stats": stats}
  want_inference = model.apply(trained, x, train=False)
  with jaxbn.linen.replace_batch_norm():
    got_inference = model.apply(trained, x, train=False)
  np.testing.assert_allclose(got_inference, want_inference, rtol=2e-5,
                             atol=2e-5)


def test_jaxbn_arguments_on_top_of_a_linen_zoo_model():
  model = ResNet()
  x = _images(1, n=16)
  variables = model.init(jax.random.key(0), x, train=False)
  with jaxbn.linen.replace_batch_norm(renorm=True, virtual_batch_size=4):
    # renorm's state joins flax's batch_stats under jaxbn's names
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, mutable=["batch_stats"])
  assert set(updates["batch_stats"]["bn_init"]) == {
      "mean", "var", "moving_stddev", "renorm_mean", "renorm_stddev"}
  # the statistics are those of four strided virtual batches
  plain = jaxbn.BatchNormConfig(momentum=0.9, epsilon=1e-5,
                                moving_variance_estimator="biased",
                                renorm=True, virtual_batch_size=4)
  inner = nn.Conv(8, (3, 3), use_bias=False).apply(
      {"params": variables["params"]["conv_init"]}, x)
  _, state = jaxbn.apply(plain, {"gamma": jnp.ones(8), "beta": jnp.zeros(8)},
                         jaxbn.init(plain, inner.shape)[1], inner,
                         training=True)
  # every entry, renorm's included (from jaxbn's initial state)
  flax_name = {"moving_mean": "mean", "moving_variance": "var"}
  for name, value in state.items():
    np.testing.assert_allclose(
        updates["batch_stats"]["bn_init"][flax_name.get(name, name)],
        value.reshape(-1), rtol=1e-5, atol=1e-6, err_msg=name)
  with pytest.raises(TypeError, match="unknown jaxbn arguments"):
    with jaxbn.linen.replace_batch_norm(use_running_average=True):
      pass


def test_a_linen_mask_and_axis_name_keep_flax_semantics():
  # vmap over examples with axis_name (statistics across the mapped axis)
  # and a mask of rows: with as many valid rows in every member, flax's
  # numbers; with uneven counts flax averages the members' masked means with
  # equal weights, jaxbn pools the valid rows (exact, float64 reference)
  rng = np.random.default_rng(0)
  x = _images(2)[:, :, :, 0]  # 8 members of (8 rows, 8 features)
  even = np.stack([rng.permutation(8) < 5 for _ in range(8)])[..., None]
  uneven = np.stack([np.arange(8) < 2 + i % 6 for i in range(8)])[..., None]
  bn = nn.BatchNorm(use_running_average=False, axis_name="batch")
  variables = bn.init(jax.random.key(0), x[0], mask=jnp.asarray(even[0]))

  def run(x, mask):
    return jax.vmap(lambda x, m: bn.apply(variables, x, mask=m,
                                          mutable=["batch_stats"]),
                    axis_name="batch")(x, jnp.asarray(mask))

  want = run(x, even)
  with jaxbn.linen.replace_batch_norm():
    got = run(x, even)
    _, pooled = run(x, uneven)
  _assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
  valid = np.asarray(x, np.float64)[np.broadcast_to(uneven, x.shape)]
  valid = valid.reshape(-1, 8)
  stats = jax.tree.map(lambda v: v[0], pooled["batch_stats"])
  # flax.linen.BatchNorm: momentum 0.99
  np.testing.assert_allclose(stats["mean"], 0.01 * valid.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * valid.var(0),
                             rtol=1e-5)


class NnxBlock(nnx.Module):
  def __init__(self, channels, rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), use_bias=False,
                         rngs=rngs)
    self.norms = nnx.List([nnx.BatchNorm(channels, momentum=0.9,
                                         epsilon=1e-5, rngs=rngs)])

  def __call__(self, x):
    return nnx.relu(self.norms[0](self.conv(x)) + x)


class NnxResNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(8, rngs), NnxBlock(8, rngs)])
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def test_an_nnx_resnet_gets_the_same_numbers_with_jaxbn_layers():
  x = _images(3)
  theirs = NnxResNet(nnx.Rngs(0))
  ours = jaxbn.nnx.replace_batch_norm(NnxResNet(nnx.Rngs(0)))
  batch_norms = [m for _, m in nnx.iter_modules(ours)
                 if isinstance(m, jaxbn.nnx.BatchNormalization)]
  assert len(batch_norms) == 3
  assert not any(isinstance(m, nnx.BatchNorm)
                 for _, m in nnx.iter_modules(ours))

  def loss(model, x):
    return jnp.sum(jnp.sin(model(x)))

  for _ in range(2):  # training steps update the statistics alike
    want = nnx.grad(loss)(theirs, x)
    got = nnx.grad(loss)(ours, x)
    np.testing.assert_allclose(got.head.kernel[...], want.head.kernel[...],
                               rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours.bn.moving_mean[...], theirs.bn.mean[...],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.blocks[1].norms[0].moving_variance[...],
                             theirs.blocks[1].norms[0].var[...], rtol=1e-5)
  theirs.eval()
  ours.eval()
  np.testing.assert_allclose(ours(x), theirs(x), rtol=2e-5, atol=2e-5)
