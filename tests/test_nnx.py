"""The NNX layer: same numbers as Linen, and NNX transforms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True


def _x(shape=(16, 5), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 2 + 1


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (16, 5)),
    ({"axis": 1}, (8, 5, 3, 3)),
    ({"axis": [1, 2], "input_rank": 3}, (8, 5, 3)),
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0}}, (16, 5)),
    ({"virtual_batch_size": 4}, (16, 5)),
    ({"activation": "relu"}, (16, 5)),
])
def test_nnx_equals_linen_over_training_steps(kwargs, shape):
  kwargs = dict(kwargs, momentum=0.7)
  input_rank = kwargs.pop("input_rank", None)
  axes = kwargs.get("axis", -1)
  axes = [axes] if isinstance(axes, int) else axes
  features = tuple(shape[a] for a in axes)
  features = features[0] if len(features) == 1 else features
  bn = jaxbn.nnx.BatchNormalization(features, input_rank=input_rank,
                                    rngs=nnx.Rngs(0), **kwargs)
  layer = jaxbn.BatchNormalization(**kwargs)
  variables = layer.init(jax.random.PRNGKey(0), _x(shape))
  for step in range(3):
    x = _x(shape, step)
    y_nnx = bn(x, training=True)
    y_linen, updates = layer.apply(variables, x, training=True,
                                   mutable=["batch_stats"])
    variables = {**variables, **updates}
    np.testing.assert_array_equal(y_nnx, y_linen)
    if kwargs.get("activation") == "relu":  # applied, not just carried
      assert float(jnp.min(y_nnx)) == 0.0
  for name, value in variables["batch_stats"].items():
    np.testing.assert_array_equal(getattr(bn, name)[...], value)
  bn.eval()
  np.testing.assert_array_equal(bn(x), layer.apply(variables, x))


def test_train_eval_modes_and_trainable_false():
  bn = jaxbn.nnx.BatchNormalization(5, rngs=nnx.Rngs(0))
  x = _x()
  bn(x)  # training mode by default (as nnx.BatchNorm)
  assert not np.allclose(bn.moving_mean[...], 0)
  bn.eval()
  before = np.asarray(bn.moving_mean[...])
  bn(x)
  np.testing.assert_array_equal(bn.moving_mean[...], before)
  bn.train()
  frozen = jaxbn.nnx.BatchNormalization(5, trainable=False, rngs=nnx.Rngs(0))
  frozen(x, training=True)
  np.testing.assert_array_equal(frozen.moving_mean[...], 0.0)


class Model(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 6, rngs=rngs)
    self.bn = jaxbn.nnx.BatchNormalization(6, momentum=0.5, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.linear(x)))


def test_nnx_jit_grad_and_optimizer_step():
  model = Model(nnx.Rngs(0))
  x = _x((16, 4))

  @nnx.jit
  def step(model, x):
    def loss_fn(model):
      return jnp.mean(model(x) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, grads

  loss, grads = step(model, x)
  assert np.isfinite(float(loss))
  assert grads.bn.gamma[...].shape == (6,)
  assert not np.allclose(model.bn.moving_mean[...], 0)  # state updated


def test_nnx_eval_shape_and_vmap_and_scan():
  abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
  assert abstract.bn.gamma.shape == (6,)

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return jaxbn.nnx.BatchNormalization(5, rngs=nnx.Rngs(key))

  ensemble = make(jax.random.split(jax.random.PRNGKey(0), 3))

  @nnx.vmap(in_axes=(0, 0), out_axes=0)
  def run(bn, x):
    return bn(x, training=True)

  xs = _x((3, 8, 5))
  ys = run(ensemble, xs)
  assert ys.shape == (3, 8, 5)
  assert ensemble.moving_mean[...].shape == (3, 5)
  for _ in range(2):  # a second call must not leak tracers
    run(ensemble, xs)

  bn = jaxbn.nnx.BatchNormalization(5, momentum=0.5, rngs=nnx.Rngs(0))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def over_batches(bn, x):
    return bn, bn(x, training=True)

  _, ys = over_batches(bn, _x((4, 8, 5)))
  assert ys.shape == (4, 8, 5)
  ref = jaxbn.nnx.BatchNormalization(5, momentum=0.5, rngs=nnx.Rngs(0))
  for x in _x((4, 8, 5)):
    ref(x, training=True)
  np.testing.assert_allclose(bn.moving_variance[...],
                             ref.moving_variance[...], rtol=1e-6)


def test_axis_list_needs_the_input_rank():
  with pytest.raises(ValueError, match="input_rank"):
    jaxbn.nnx.BatchNormalization((3, 4), axis=[1, 2], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="one size per channel axis"):
    jaxbn.nnx.BatchNormalization(3, axis=[1, 2], input_rank=3,
                                 rngs=nnx.Rngs(0))


def test_random_initializers_draw_independent_params_and_state():
  # one draw from the params stream per parameter, as nnx.BatchNorm, then one
  # for the moving statistics (random initializers only), split as
  # jaxbn.init_state splits it
  init = {"class_name": "RandomNormal", "config": {"stddev": 1.0}}
  kwargs = dict(gamma_initializer=init, moving_mean_initializer=init)
  bn = jaxbn.nnx.BatchNormalization(16, rngs=nnx.Rngs(0), **kwargs)
  assert not np.allclose(bn.gamma[...], bn.moving_mean[...])
  rngs = nnx.Rngs(0)
  gamma_key, _, state_key = rngs.params(), rngs.params(), rngs.params()
  config = jaxbn.BatchNormConfig(**kwargs)
  np.testing.assert_array_equal(
      bn.gamma[...], config.gamma_initializer(gamma_key, (16,)))
  np.testing.assert_array_equal(
      bn.moving_mean[...],
      jaxbn.init_state(config, (16,), key=state_key)["moving_mean"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_and_param_dtype_as_flax(dtype):
  x = jnp.asarray(np.random.default_rng(0).normal(3, 2, (32, 6)), dtype)
  ours = jaxbn.nnx.BatchNormalization(6, momentum=0.9, dtype=dtype,
                                      param_dtype=dtype, rngs=nnx.Rngs(0),
                                      moving_variance_estimator="biased")
  theirs = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-3, dtype=dtype,
                         param_dtype=dtype, rngs=nnx.Rngs(0))
  assert ours.gamma[...].dtype == theirs.scale[...].dtype == dtype
  assert ours.moving_mean[...].dtype == jnp.float32
  y, y_flax = ours(x, training=True), theirs(x)
  assert y.dtype == y_flax.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(y_flax, np.float32), atol=2e-2)
  np.testing.assert_allclose(ours.moving_mean[...], theirs.mean[...],
                             rtol=1e-5)
  np.testing.assert_allclose(ours.moving_variance[...], theirs.var[...],
                             rtol=1e-4)


def test_parameter_keys_are_drawn_as_nnx_batch_norm_draws_them():
  # one key for gamma, one for beta, none for constant moving statistics:
  # swapping nnx.BatchNorm for jaxbn's layer leaves later layers as they were
  class Model(nnx.Module):
    def __init__(self, make_bn, rngs):
      self.bn = make_bn(rngs)
      self.dense = nnx.Linear(4, 3, rngs=rngs)

  normal = jax.nn.initializers.normal(0.5)
  for scale, center in [(True, True), (True, False), (False, True)]:
    theirs = Model(lambda r: nnx.BatchNorm(
        4, use_scale=scale, use_bias=center, scale_init=normal,
        bias_init=normal, rngs=r), nnx.Rngs(3))
    ours = Model(lambda r: jaxbn.nnx.BatchNormalization(
        4, scale=scale, center=center,
        gamma_initializer={"class_name": "RandomNormal",
                           "config": {"stddev": 0.5, "mean": 0.0}},
        beta_initializer={"class_name": "RandomNormal",
                          "config": {"stddev": 0.5, "mean": 0.0}},
        rngs=r), nnx.Rngs(3))
    np.testing.assert_array_equal(ours.dense.kernel[...],
                                  theirs.dense.kernel[...])
    if scale:
      np.testing.assert_array_equal(ours.bn.gamma[...], theirs.bn.scale[...])
    if center:
      np.testing.assert_array_equal(ours.bn.beta[...], theirs.bn.bias[...])
