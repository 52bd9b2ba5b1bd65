"""Runs tf_keras' BatchNormalization and jaxbn side by side.

Both layers start from the same variables, see the same inputs and
cotangents, take plain SGD steps on gamma/beta, and record per step: the
output, the gradients with respect to x, gamma and beta, and every state
variable after the update; finally an inference output.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

_keras = None
# (configurations, quantity comparisons) checked in this session, for the
# summary printed at the end of the test run
TALLY = {"configs": 0, "checks": 0}


def keras():
  global _keras
  if _keras is None:
    import tensorflow as tf  # noqa: F401  (imported for its side effects)
    import tf_keras
    tf_keras.utils.disable_interactive_logging()
    _keras = tf_keras
  return _keras


def make_inputs(shape, steps, seed, *, mean=2.0, std=3.0, dtype=np.float32):
  rng = np.random.RandomState(seed)
  channel_shift = rng.uniform(-mean, mean, size=shape[-1:])
  xs = [(rng.randn(*shape) * std + channel_shift).astype(dtype)
        for _ in range(steps)]
  dys = [rng.randn(*shape).astype(dtype) for _ in range(steps)]
  return xs, dys


def run_keras(kwargs, xs, dys, *, mask=None, adjustment=None, lr=0.05,
              seed=0, set_weights=True):
  import tensorflow as tf
  k = keras()
  kwargs = dict(kwargs)
  if adjustment is not None:
    kwargs["adjustment"] = lambda shape: tuple(
        tf.constant(v) for v in adjustment(tuple(shape.numpy())
                                           if hasattr(shape, "numpy")
                                           else shape))
  layer = k.layers.BatchNormalization(**kwargs)
  layer.build(xs[0].shape)
  rng = np.random.RandomState(seed + 1000)
  if set_weights:
    for var in layer.weights:
      name = var.name.split("/")[-1].split(":")[0]
      if name in ("gamma", "moving_variance"):
        var.assign(rng.uniform(0.5, 1.5, var.shape).astype(np.float32))
      elif name in ("beta", "moving_mean"):
        var.assign(rng.uniform(-1, 1, var.shape).astype(np.float32))
  initial = {v.name.split("/")[-1].split(":")[0]: v.numpy()
             for v in layer.weights}
  records = []
  for x, dy in zip(xs, dys):
    xt = tf.constant(x)
    watched = [v for v in (layer.gamma, layer.beta) if v is not None]
    with tf.GradientTape() as tape:
      tape.watch(xt)
      for v in watched:
        tape.watch(v)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = layer(xt, training=True,
                  mask=None if mask is None else tf.constant(mask))
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.constant(
          dy, tf.float32))
    grads = tape.gradient(loss, [xt] + watched)
    rec = {"y": y.numpy(), "dx": grads[0].numpy()}
    names = [n for n, v in (("gamma", layer.gamma), ("beta", layer.beta))
             if v is not None]
    for n, g in zip(names, grads[1:]):
      rec["d" + n] = np.zeros(getattr(layer, n).shape, np.float32) \
          if g is None else g.numpy()
    for n, g in zip(names, grads[1:]):
      if g is not None:
        getattr(layer, n).assign_sub(lr * g)
    rec["state"] = {v.name.split("/")[-1].split(":")[0]: v.numpy()
                    for v in layer.non_trainable_weights
                    if v.name.split("/")[-1].split(":")[0] not in
                    ("gamma", "beta")}
    records.append(rec)
  y_inf = layer(tf.constant(xs[0]), training=False).numpy()
  return initial, records, y_inf, layer


def run_jaxbn(config, initial, xs, dys, *, mask=None, adjustment=None,
              lr=0.05, key=None):
  params_like, state_like = jax.eval_shape(
      lambda: jaxbn.init(config, xs[0].shape))
  params = {n: jnp.asarray(initial[n]).reshape(v.shape)
            for n, v in params_like.items()}
  state = {n: (jnp.asarray(initial[n]).reshape(v.shape) if n in initial
               else jnp.zeros(v.shape, v.dtype))
           for n, v in state_like.items()}
  if adjustment is not None:
    config = jaxbn.BatchNormConfig(**{
        **{f: getattr(config, f) for f in config.__dataclass_fields__},
        "adjustment": lambda shape, key: tuple(
            jnp.asarray(v) for v in adjustment(shape))})

  @jax.jit
  def step(params, state, x, dy):
    def f(params, x):
      return jaxbn.apply(config, params, state, x, training=True,
                         mask=mask, key=key)
    (y, new_state), vjp = jax.vjp(f, params, x)
    dparams, dx = vjp((dy.astype(y.dtype),
                       jax.tree_util.tree_map(jnp.zeros_like, new_state)))
    return y, dx, dparams, new_state

  records = []
  for x, dy in zip(xs, dys):
    y, dx, dparams, new_state = step(params, state, jnp.asarray(x),
                                     jnp.asarray(dy))
    rec = {"y": np.asarray(y), "dx": np.asarray(dx),
           "state": {k: np.asarray(v) for k, v in new_state.items()}}
    for n, g in dparams.items():
      rec["d" + n] = np.asarray(g)
    records.append(rec)
    params = {n: p - lr * dparams[n] for n, p in params.items()}
    state = new_state
  y_inf, _ = jaxbn.apply(config, params, state, jnp.asarray(xs[0]),
                         training=False)
  return records, np.asarray(y_inf)


def assert_close(actual, expected, rtol, what, floor=1e-6):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64).reshape(actual.shape)
  scale = max(float(np.max(np.abs(expected))), floor)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale,
                             err_msg=what)


def compare(kwargs, shape, *, steps=3, seed=0, mask=None, adjustment=None,
            rtol=2e-4, config_extra=None, data_mean=2.0, data_std=3.0):
  """Runs both libraries; asserts equality; returns the number of checks."""
  xs, dys = make_inputs(shape, steps, seed, mean=data_mean, std=data_std)
  if mask is not None:  # padding's outputs are unused: a loss reads the rest
    valid = np.asarray(mask)[..., None].astype(np.float32)
    dys = [dy * valid for dy in dys]
  initial, k_recs, k_inf, _ = run_keras(kwargs, xs, dys, mask=mask,
                                        adjustment=adjustment, seed=seed)
  config = jaxbn.BatchNormConfig(**kwargs, **(config_extra or {}))
  j_mask = None if mask is None else np.asarray(mask)[..., None]
  j_recs, j_inf = run_jaxbn(config, initial, xs, dys, mask=j_mask,
                            adjustment=adjustment)
  checks = 0
  for step, (k, j) in enumerate(zip(k_recs, j_recs)):
    for q in ("y", "dx", "dgamma", "dbeta"):
      if q in k:
        assert_close(j[q], k[q], rtol, f"step {step}: {q}")
        checks += 1
    for name, value in k["state"].items():
      # With renorm, moving_variance = moving_stddev**2 - epsilon: both
      # libraries lose digits relative to epsilon, not to the result.
      floor = config.epsilon if config.renorm else 1e-6
      assert_close(j["state"][name], value, rtol, f"step {step}: {name}",
                   floor=floor)
      checks += 1
  assert_close(j_inf, k_inf, rtol, "inference output")
  TALLY["configs"] += 1
  TALLY["checks"] += checks + 1
  return checks + 1
