"""The functional core against a NumPy float64 reference, and its gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from tests import numpy_reference

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

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
      bessel=resolved.bessel)
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


# every feature with a mask (the weighted passes), the plain ones without
# too (each case compiles three float64 programs)
@pytest.mark.parametrize("kwargs,use_mask", [
    (kwargs, use_mask) for i, kwargs in enumerate(GRAD_CASES)
    for use_mask in ((False, True) if i < 2 else (True,))], ids=str)
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

    # jitted: one compiled program per derivative instead of op by op
    check_grads(jax.jit(loss), (params, x), order=2, modes=["rev"],
                atol=1e-5, rtol=1e-5)


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
    y, vjp = jax.vjp(jax.jit(f), params, x)
    out[fused] = (y, vjp(dy))
  for a, b in zip(jax.tree_util.tree_leaves(out[None]),
                  jax.tree_util.tree_leaves(out[False])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_custom_vjp_differentiates_every_output():
  # jaxbn.apply stops gradients into the state, but the fused building block
  # is differentiable in all its outputs (statistics included).
  from jaxbn.closed_form import TrainingPlan, batch_norm_train
  with jax.enable_x64(True):
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(6, 3) * 2 + 1)
    w = jnp.asarray(rng.rand(6, 1) > 0.3, jnp.float64)
    c = jnp.asarray(rng.randn(3))

    def f(x, gamma, beta):
      y, (mean, var, _), _ = batch_norm_train(x, gamma, beta, w, (),
                                              TrainingPlan((0,), 1e-3))
      return (jnp.sum(jnp.where(w > 0, jnp.sin(y), 0)) + jnp.sum(mean * c)
              + jnp.sum(var ** 2))

    check_grads(jax.jit(f),
                (x, jnp.ones((1, 3)) * 1.3, jnp.zeros((1, 3)) + 0.2),
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


@pytest.mark.parametrize("kwargs", [
    {}, {"renorm": True}, {"renorm": True, "renorm_clipping": {"rmax": 2.0}},
    {"renorm": True, "renorm_clipping": {"rmax": lambda step: 1.0 + step}},
    {"accumulation_steps": 3},
    {"renorm": True, "renorm_clipping": {"dmax": lambda step: step},
     "accumulation_steps": 2}], ids=["plain", "renorm", "clipped",
                                     "scheduled", "accumulated",
                                     "scheduled + accumulated"])
def test_state_names_are_the_entries_init_creates_in_order(kwargs):
  config = jaxbn.BatchNormConfig(**kwargs)
  _, state = jaxbn.init(config, (4, 3))
  assert jaxbn.state_names(config) == tuple(state)


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


def test_forward_mode_of_the_fast_path_runs_plain_autodiff():
  # jvp, jacfwd and hessian (jacfwd of jacrev) of the default config: the
  # custom VJP has no forward mode, so the layer differentiates the same
  # forward by plain autodiff; every derivative agrees with reverse mode (the
  # closed-form backward, over the kernels) and with fused=False
  x = jnp.asarray(np.random.RandomState(7).randn(6, 3), jnp.float32)
  fast = jaxbn.BatchNormConfig()
  plain = jaxbn.BatchNormConfig(fused=False)
  params, state = jaxbn.init(fast, x.shape)
  f = lambda c: (lambda x: jaxbn.apply(c, params, state, x, training=True)[0])
  loss = lambda x: jnp.sum(jnp.sin(f(fast)(x)) * x)
  reverse = jax.jit(jax.jacrev(f(fast)))(x)
  for c in (fast, plain):
    np.testing.assert_allclose(jax.jit(jax.jacfwd(f(c)))(x), reverse,
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.hessian(loss))(x),
                             jax.jit(jax.jacrev(jax.jacrev(loss)))(x),
                             rtol=1e-4, atol=1e-4)
  t = jnp.cos(x)
  y, dy = jax.jit(lambda x, t: jax.jvp(f(fast), (x,), (t,)))(x, t)
  np.testing.assert_allclose(y, f(fast)(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dy.reshape(18),
                             reverse.reshape(18, 18) @ t.reshape(18),
                             rtol=1e-5, atol=1e-5)
  # reverse mode keeps the closed-form backward (over the CPU kernels)
  assert "jaxbn_kernel_call" in str(jax.make_jaxpr(jax.grad(loss))(x))


# ------------------------------------------------------- masks and inputs

PADDING_CASES = [  # (shape, config, mask shape, kernels)
    ((8, 4, 3, 6), {}, (8, 1, 1, 1), "on"),  # row mask: the kernel path
    ((8, 4, 3, 6), {}, (8, 1, 1, 1), "off"),  # the same in XLA
    ((8, 4, 6), {}, (8, 4), "on"),  # Keras' (batch, time) sequence mask
    ((8, 4, 6), {}, (8, 4, 6), "on"),  # per element: XLA
    ((8, 4, 6), {"virtual_batch_size": 4}, (8, 4), "on"),
    ((8, 4, 6), {"fused": False}, (8, 4), "on"),  # the autodiff reference
    ((8, 6, 4, 4), {"axis": 1, "renorm": True}, (8, 1, 4, 1), "on"),
]


@pytest.mark.parametrize("shape,kwargs,mask_shape,kernels", PADDING_CASES,
                         ids=str)
def test_padding_never_reaches_statistics_or_gradients(shape, kwargs,
                                                       mask_shape, kernels):
  rng = np.random.RandomState(11)
  config = jaxbn.BatchNormConfig(momentum=0.5, **kwargs)
  x = rng.randn(*shape).astype(np.float32) * 2 + 1
  mask = rng.rand(*mask_shape) > 0.3
  mask[0] = True  # every virtual batch keeps valid rows
  mask[-1] = False
  full = np.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)),
                         x.shape)
  poisoned = x.copy()
  poisoned[~full] = np.where(rng.rand((~full).sum()) > 0.5, np.nan, np.inf)
  params, state = _random_state(config, shape, rng)
  cotangent = jnp.asarray(rng.randn(*shape), jnp.float32)

  def step(params, x):
    y, new_state = jaxbn.apply(config, params, state, x, training=True,
                               mask=mask)
    loss = jnp.sum(jnp.where(full, y * cotangent, 0))
    return loss, (y, new_state)

  with jaxbn.cpu_kernels.use(kernels):
    run = jax.jit(jax.value_and_grad(step, argnums=(0, 1), has_aux=True))
    (_, (y_clean, s_clean)), g_clean = run(params, jnp.asarray(x))
    (_, (y_bad, s_bad)), g_bad = run(params, jnp.asarray(poisoned))
  # the clean run against NumPy over the valid elements only
  resolved = config.resolve(shape)
  np_state = {k: np.asarray(v) for k, v in state.items()}
  if not config.renorm and config.virtual_batch_size is None:
    y_ref, s_ref = numpy_reference.batch_norm_train(
        x, params["gamma"], params["beta"], np_state, axes=resolved.axes,
        momentum=0.5, epsilon=1e-3, mask=full,
        bessel=resolved.bessel)
    np.testing.assert_allclose(np.asarray(y_clean)[full], y_ref[full],
                               rtol=1e-4, atol=1e-4)
    for k in ("moving_mean", "moving_variance"):
      np.testing.assert_allclose(s_clean[k], s_ref[k], rtol=1e-5, atol=1e-6)
  # poisoned padding changes nothing but the padding's own outputs: bit for
  # bit, except where the mask varies along every reduced axis. There, on
  # XLA:CPU, a channel whose masked sums come out non-finite has them taken
  # again in a loop of their own (stats.sibling_sums): the same valid values,
  # summed in an order the compiler chooses, equal to float32 rounding
  per_element = all(a < len(mask_shape) and mask_shape[a] > 1
                    for a in resolved.reduction_axes)
  same = (functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
          if per_element else np.testing.assert_array_equal)
  same(np.asarray(y_bad)[full], np.asarray(y_clean)[full])
  for k in s_clean:
    same(s_bad[k], s_clean[k])
  for a, b in zip(jax.tree.leaves(g_bad), jax.tree.leaves(g_clean)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  dx = np.asarray(g_clean[1])
  assert np.all(dx[~full] == 0)  # padding gets no gradient


def test_masked_gradients_are_the_valid_elements_gradients():
  # Padding's outputs are constants: the gradient equals that of a batch
  # norm over the valid rows alone (checked in float64 against autodiff of
  # the NumPy-shaped formula on those rows).
  with jax.enable_x64(True):
    rng = np.random.RandomState(12)
    x = jnp.asarray(rng.randn(10, 4) * 3 + 2)
    mask = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    config = jaxbn.BatchNormConfig()
    params, state = jaxbn.init(config, x.shape, dtype=jnp.float64)
    params = {k: v + 0.3 for k, v in params.items()}
    c = jnp.asarray(rng.randn(10, 4))

    def masked(params, x):
      y, _ = jaxbn.apply(config, params, state, x, training=True, mask=mask)
      return jnp.sum(jnp.where(mask[:, None], jnp.sin(y) * c, 0))

    def valid_only(params, x):
      xv = x[mask]
      mean = xv.mean(0)
      var = ((xv - mean) ** 2).mean(0)
      y = (xv - mean) / jnp.sqrt(var + 1e-3) * params["gamma"] + params["beta"]
      return jnp.sum(jnp.sin(y) * c[mask])

    for fused in (None, False):
      config = jaxbn.BatchNormConfig(fused=fused)
      gm = jax.jit(jax.grad(masked, argnums=(0, 1)))(params, x)
      gv = jax.jit(jax.grad(valid_only, argnums=(0, 1)))(params, x)
      for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(gv)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("values", [[1, -1, 0, 2], [0.5, 1, 0, np.nan],
                                    [True, True, False, True]], ids=str)
def test_numeric_masks_mean_nonzero_is_valid(values):
  rng = np.random.RandomState(13)
  x = jnp.asarray(rng.randn(4, 3), jnp.float32)
  config = jaxbn.BatchNormConfig(momentum=0.0)
  params, state = jaxbn.init(config, x.shape)
  y, new = jaxbn.apply(config, params, state, x, training=True,
                       mask=np.asarray(values))
  valid = np.asarray(values, np.float64) != 0
  y_ref, s_ref = numpy_reference.batch_norm_train(
      x, None, None, {k: np.asarray(v) for k, v in state.items()}, axes=(1,),
      momentum=0.0, epsilon=1e-3, mask=valid[:, None])
  np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.asarray(new["moving_variance"]) >= 0)
  np.testing.assert_allclose(new["moving_variance"], s_ref["moving_variance"],
                             rtol=1e-5)


def test_lower_rank_masks_align_with_the_leading_axes():
  # A (batch,) mask on a square input masks rows (Keras), not channels.
  x = jnp.arange(16.0).reshape(4, 4)
  config = jaxbn.BatchNormConfig(momentum=0.0)
  params, state = jaxbn.init(config, x.shape)
  _, new = jaxbn.apply(config, params, state, x, training=True,
                       mask=jnp.array([True, True, False, False]))
  np.testing.assert_allclose(new["moving_mean"], np.asarray(x)[:2].mean(0))
  x3 = jnp.asarray(np.random.RandomState(0).randn(2, 3, 5), jnp.float32)
  params, state = jaxbn.init(config, x3.shape)
  m = np.array([[1, 1, 0], [1, 0, 0]], bool)
  _, new = jaxbn.apply(config, params, state, x3, training=True, mask=m)
  np.testing.assert_allclose(new["moving_mean"], np.asarray(x3)[m].mean(0),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"`mask` of shape \(4,\) .* \(3, 4\)"):
    jaxbn.apply(config, *jaxbn.init(config, (3, 4)), jnp.ones((3, 4)),
                training=True, mask=jnp.ones(4, bool))


def test_sequence_mask_matches_keras_3():
  keras = pytest.importorskip("keras")
  rng = np.random.RandomState(14)
  x = rng.randn(4, 6, 5).astype(np.float32) * 3 + 1
  mask = rng.rand(4, 6) > 0.4
  x[~mask] = np.nan  # padding Keras 3 also ignores
  layer = keras.layers.BatchNormalization(momentum=0.5)
  y_keras = np.asarray(layer(x, training=True, mask=mask))
  module, variables = jaxbn.from_keras(layer)
  config = module.config
  params, state = jaxbn.init(config, x.shape)
  y, new = jaxbn.apply(config, params, state, jnp.asarray(x), training=True,
                       mask=mask)
  np.testing.assert_allclose(np.asarray(y)[mask], y_keras[mask], rtol=1e-4,
                             atol=1e-4)
  for name in ("moving_mean", "moving_variance"):
    np.testing.assert_allclose(new[name], variables["batch_stats"][name],
                               rtol=1e-5, atol=1e-6)


def test_padding_matches_flax_linen_statistics():
  import flax.linen as nn
  rng = np.random.RandomState(15)
  x = rng.randn(6, 4, 3).astype(np.float32) + 2
  mask = np.broadcast_to(rng.rand(6, 4, 1) > 0.3, x.shape)
  x[~mask] = np.nan
  bn = nn.BatchNorm(use_running_average=False, momentum=0.5, epsilon=1e-3)
  variables = bn.init(jax.random.PRNGKey(0), x, mask=mask)
  y_flax, updates = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
  config = jaxbn.BatchNormConfig(momentum=0.5)
  params, state = jaxbn.init(config, x.shape)
  y, new = jaxbn.apply(config, params, state, jnp.asarray(x), training=True,
                       mask=mask)
  np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_flax)[mask],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["moving_mean"],
                             updates["batch_stats"]["mean"], rtol=1e-5)
  np.testing.assert_allclose(new["moving_variance"],
                             updates["batch_stats"]["var"], rtol=1e-4)


def test_integer_and_bool_inputs_are_cast_like_keras():
  import tf_keras
  keras = pytest.importorskip("keras")
  x = np.arange(48).reshape(4, 2, 6).astype(np.int32) % 7
  config = jaxbn.BatchNormConfig(momentum=0.5)
  params, state = jaxbn.init(config, x.shape)
  for data in (x, x > 3):
    y, new = jaxbn.apply(config, params, state, jnp.asarray(data),
                         training=True)
    assert y.dtype == jnp.float32
    for layer in (tf_keras.layers.BatchNormalization(momentum=0.5),
                  keras.layers.BatchNormalization(momentum=0.5)):
      y_keras = np.asarray(layer(data.astype(np.float32)
                                 if data.dtype == bool else data,
                                 training=True))
      np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(
          new["moving_mean"], np.asarray(layer.moving_mean), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, dict(renorm=True, axis=1),
                                    dict(virtual_batch_size=4)])
def test_fused_relu_equals_a_relu_after_the_layer(kwargs):
  # activation='relu' against nn.relu applied to the plain layer's output:
  # outputs, state, and the gradients of every input; and inference against
  # the NumPy float64 reference followed by max(., 0).
  shape = (16, 6, 3, 5)
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(0.5, 2, shape), jnp.float32)
  dy = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
  results = {}
  for activation in (None, "relu"):
    config = jaxbn.BatchNormConfig(activation=activation, momentum=0.8,
                                   **kwargs)
    params, state = _random_state(config, shape, rng=np.random.default_rng(1))

    def f(params, x, config=config, state=state):
      y, new_state = jaxbn.apply(config, params, state, x, training=True)
      return (jax.nn.relu(y) if config.activation is None else y), new_state

    (y, new_state), vjp = jax.jit(lambda p, x, f=f: jax.vjp(f, p, x))(params, x)
    grads = vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))
    results[activation] = (y, new_state, grads)
    if activation == "relu":
      assert 0.05 < float(jnp.mean(y > 0)) < 0.95  # the gate matters
      resolved = config.resolve(shape)
      want = numpy_reference.batch_norm_inference(
          x, params["gamma"], params["beta"], state, axes=resolved.axes,
          epsilon=config.epsilon)
      got = jaxbn.apply(config, params, state, x, training=False)[0]
      np.testing.assert_allclose(got, np.maximum(want, 0), rtol=1e-5,
                                 atol=1e-5)
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(results["relu"]),
      jax.tree_util.tree_leaves(results[None])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("wrt", [0, (0, 1)])
@pytest.mark.parametrize("path", ["kernels", "xla", "accelerator"])
def test_a_non_finite_cotangent_behind_a_closed_relu_gate_stays_out(path,
                                                                    wrt):
  # jax.nn.relu's rule gives 0 behind a closed gate whatever dy holds there
  # (the cotangent of sqrt(relu(z)) is infinite exactly there): every path
  # keeps it so, XLA:CPU's product-form gate included (its sums are taken
  # again with the select for the channels it leaves non-finite), masked or
  # not, for the gradients of the parameters alone and of x too
  from jaxbn import cpu_kernels, modes
  shape = (16, 6, 3, 5)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(0.5, 2, shape), jnp.float32)
  dy = rng.normal(0, 1, shape).astype(np.float32)
  mask = jnp.arange(16) % 4 != 0
  plain = jaxbn.BatchNormConfig()
  params, state = _random_state(plain, shape, rng=np.random.default_rng(1))
  for m in (None, mask):
    z, _ = jaxbn.apply(plain, params, state, x, training=True, mask=m)
    closed = np.asarray(z) <= 0
    closed[:, :, :, 1] = False  # a channel with every gate open stays exact
    poison = np.array([np.inf, -np.inf, np.nan], np.float32)
    d = dy.copy()
    d[closed] = poison[np.arange(closed.sum()) % 3]
    results = {}
    for activation in (None, "relu"):
      config = jaxbn.BatchNormConfig(activation=activation)

      def loss(p, x, config=config, m=m, d=jnp.asarray(d)):
        y, _ = jaxbn.apply(config, p, state, x, training=True, mask=m)
        y = jax.nn.relu(y) if config.activation is None else y
        return jnp.sum(y * d)

      if activation is None:  # the reference: relu after the layer, in XLA
        with cpu_kernels.use("off"):
          results[activation] = jax.jit(jax.grad(loss, wrt))(params, x)
        continue
      scope = {"kernels": cpu_kernels.use("on"),
               "xla": cpu_kernels.use("off"),
               "accelerator": modes.statistics("accelerator")}[path]
      with scope:
        results[activation] = jax.jit(jax.grad(loss, wrt))(params, x)
    got, want = (jax.tree_util.tree_leaves(results[k]) for k in ("relu", None))
    assert np.isfinite(np.asarray(got[0])).all()
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_eager_call_runs_as_one_compiled_program_per_configuration():
  # Eagerly, apply compiles its whole computation once per configuration
  # and shapes (a second call reuses it), with the numbers of a jitted call;
  # an adjustment callable stays eager, called on every call.
  from jaxbn import eager
  config = jaxbn.BatchNormConfig(momentum=0.7, renorm=True,
                                 virtual_batch_size=4)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(2, 3, (16, 3)), jnp.float32)
  params, state = _random_state(config, x.shape, rng)
  eager.clear()
  y, new_state = jaxbn.apply(config, params, state, x, training=True)
  assert eager.size() == 1
  y2, _ = jaxbn.apply(config, params, new_state, x + 1, training=True)
  assert eager.size() == 1  # reused
  y_jit, state_jit = jax.jit(lambda p, s, x: jaxbn.apply(
      config, p, s, x, training=True))(params, state, x)
  np.testing.assert_allclose(y, y_jit, rtol=1e-6, atol=1e-6)
  for k in state_jit:
    np.testing.assert_allclose(new_state[k], state_jit[k], rtol=1e-6)
  y_inf, same = jaxbn.apply(config, params, new_state, x, training=False)
  assert eager.size() == 2
  assert same["moving_mean"] is new_state["moving_mean"]
  calls = []

  def adjustment(shape):
    calls.append(shape)
    return jnp.full(shape[-1:], 1.0 + 0.5 * len(calls)), jnp.zeros(shape[-1:])

  adjusted = jaxbn.BatchNormConfig(adjustment=adjustment)
  p, s = jaxbn.init(adjusted, x.shape)
  first, _ = jaxbn.apply(adjusted, p, s, x, training=True)
  second, _ = jaxbn.apply(adjusted, p, s, x, training=True)
  assert len(calls) == 2
  np.testing.assert_allclose(second, first * 2.0 / 1.5, rtol=1e-5, atol=1e-6)
  # an eager grad (and vmap of it) runs the same program, with the gradients
  # of a jitted grad; under jit, and under forward-mode autodiff (which takes
  # the autodiff reference), apply is traced inline, as any JAX function
  loss = lambda x: jnp.sum(jaxbn.apply(config, params, state, x,
                                       training=True)[0] ** 2)
  eager.clear()
  grad = jax.grad(loss)(x)
  assert eager.size() == 1
  np.testing.assert_allclose(grad, jax.jit(jax.grad(loss))(x), rtol=1e-5,
                             atol=1e-5)
  batched = jax.vmap(jax.grad(loss))(jnp.stack([x, x + 1]))
  np.testing.assert_allclose(batched[0], grad, rtol=1e-5, atol=1e-5)
  assert eager.size() == 1
  eager.clear()
  jax.jvp(loss, (x,), (jnp.ones_like(x),))
  jax.jit(jax.grad(loss))(x + 2)
  assert eager.size() == 0


def test_eager_programs_are_bounded_and_keyed_on_the_arithmetic(monkeypatch):
  # many batch shapes keep at most MAX_PROGRAMS compiled (least recently used
  # out); a regularizer or initializer built anew on every call is not part
  # of the key (apply never reads it), so the program is reused
  from jaxbn import eager
  monkeypatch.setattr(eager, "MAX_PROGRAMS", 4)
  eager.clear()
  config = jaxbn.BatchNormConfig(momentum=0.5)
  params, state = jaxbn.init(config, (1, 3))
  rows = list(range(2, 12))
  for n in rows:
    x = jnp.arange(3.0 * n).reshape(n, 3)
    y, _ = jaxbn.apply(config, params, state, x, training=True)
    np.testing.assert_allclose(
        y, (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-3), rtol=1e-5, atol=1e-5)
    assert eager.size() == min(n - 1, 4)
  kept = [next(shape for shape, _ in key[-1] if len(shape) == 2)
          for key in eager._programs]  # x's shapes, least recent first
  assert kept == [(n, 3) for n in rows[-4:]]
  eager.clear()
  for i in range(5):
    fresh = jaxbn.BatchNormConfig(
        momentum=0.5, gamma_regularizer=lambda w, i=i: i * jnp.sum(w ** 2),
        beta_initializer=lambda key, shape, dtype: jnp.zeros(shape, dtype))
    jaxbn.apply(fresh, params, state, jnp.ones((4, 3)), training=True)
  assert eager.size() == 1
  (program,) = eager._programs.values()
  assert program._cache_size() == 1
  jax.clear_caches()  # frees the executables
  assert program._cache_size() == 0
  eager.clear()
  assert eager.size() == 0
