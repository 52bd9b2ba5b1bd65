"""The functional core: ``init`` and ``apply`` over explicit pytrees.

``params = {'gamma', 'beta'}`` (each only with ``scale``/``center``) and
``state = {'moving_mean', 'moving_variance'}`` (+ ``moving_stddev``,
``renorm_mean``, ``renorm_stddev`` with renorm, + ``renorm_step`` when a
clipping bound is a schedule). Shapes are Keras': ``(C,)`` for one channel
axis, the input shape with 1 in every reduced axis for an axis list.

Training (``training=True`` and ``config.trainable``), with batch statistics
``mu``, ``var`` over every axis but the channel axes::

  x_hat = (x - mu) / sqrt(var + epsilon)
  y     = ((x_hat * r + d) * adj_scale + adj_bias) * gamma + beta
  moving_mean     <- ema(moving_mean, mu, momentum)
  moving_variance <- ema(moving_variance, var', momentum)

``r = 1, d = 0`` without renorm, ``adj_* = 1, 0`` without adjustment, ``var'``
the batch variance, Bessel-corrected where Keras' fused kernel would run (see
``BatchNormConfig.moving_variance_estimator``). Inference::

  y = (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta

Batch Renorm (Ioffe 2017), as Keras: with ``s = sqrt(var + epsilon)`` and
``sigma = max(renorm_stddev, sqrt(epsilon))`` from *before* the update,
``r = clip(s / sigma, rmin, rmax)``, ``d = clip((mu - renorm_mean) / sigma,
-dmax, dmax)``, both without gradient; then ``renorm_mean``/``renorm_stddev``
follow ``mu``/``s`` with ``renorm_momentum``, ``moving_stddev`` follows ``s``
with ``momentum``, and ``moving_variance = max(moving_stddev^2 - epsilon, 0)``.

Ghost batch norm (``virtual_batch_size = v``): in training the batch is split
into ``B / v`` virtual batches, each normalized with its own statistics; the
moving averages follow the (count-weighted) mean over virtual batches of their
means and variances. Inference does not depend on the batch size.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import fused as fused_lib
from jaxbn import stats
from jaxbn.config import BatchNormConfig
from jaxbn.moving_averages import ema

Params = dict
State = dict


# --------------------------------------------------------------------- init


def variable_shapes(config: BatchNormConfig, input_shape) -> tuple:
  """``(param_shape, Resolved)`` for an input shape."""
  resolved = config.resolve(input_shape)
  return resolved.param_shape, resolved


def init_params(config: BatchNormConfig, param_shape, *, key=None,
                dtype=jnp.float32) -> Params:
  """``{'gamma', 'beta'}`` from the config's initializers."""
  keys = _split(key, 2)
  params = {}
  if config.scale:
    params["gamma"] = config.gamma_initializer(keys[0], param_shape, dtype)
  if config.center:
    params["beta"] = config.beta_initializer(keys[1], param_shape, dtype)
  return params


def init_state(config: BatchNormConfig, param_shape, *, key=None,
               dtype=jnp.float32) -> State:
  """Moving statistics (and renorm statistics) from the config."""
  keys = _split(key, 2)
  mean = config.moving_mean_initializer(keys[0], param_shape, dtype)
  variance = config.moving_variance_initializer(keys[1], param_shape, dtype)
  state = {"moving_mean": mean, "moving_variance": variance}
  if config.renorm:
    state["moving_stddev"] = jnp.sqrt(variance)
    state["renorm_mean"] = mean
    state["renorm_stddev"] = jnp.sqrt(variance)
    if config.renorm_clipping is not None and \
        config.renorm_clipping.is_scheduled:
      state["renorm_step"] = jnp.zeros((), jnp.int32)
  return state


def state_names(config: BatchNormConfig) -> tuple:
  """Names of the state entries ``init_state`` creates for this config."""
  names = ("moving_mean", "moving_variance")
  if config.renorm:
    names += ("moving_stddev", "renorm_mean", "renorm_stddev")
    if config.renorm_clipping is not None and \
        config.renorm_clipping.is_scheduled:
      names += ("renorm_step",)
  return names


def init(config: BatchNormConfig, input_shape, *, key=None,
         dtype=jnp.float32) -> tuple[Params, State]:
  """Creates ``(params, state)`` for inputs of ``input_shape``.

  Args:
    config: the layer's arguments.
    input_shape: shape of an input batch (only the rank and channel sizes
      matter).
    key: PRNG key, needed only by random initializers.
    dtype: dtype of the variables (float32 unless you need float64).
  """
  _check_param_dtype(dtype)
  param_shape, _ = variable_shapes(config, input_shape)
  key_params, key_state = _split(key, 2)
  return (init_params(config, param_shape, key=key_params, dtype=dtype),
          init_state(config, param_shape, key=key_state, dtype=dtype))


def _split(key, n):
  if key is None:
    return [None] * n
  return list(jax.random.split(key, n))


# -------------------------------------------------------------------- apply


def apply(config: BatchNormConfig, params: Mapping[str, Any],
          state: Mapping[str, Any], x: jax.Array, *, training: bool,
          key: jax.Array | None = None, axis_name=None,
          axis_index_groups=None, mask: jax.Array | None = None
          ) -> tuple[jax.Array, State]:
  """Normalizes ``x``; returns ``(y, new_state)``.

  Args:
    config: the layer's arguments.
    params: ``{'gamma', 'beta'}`` as made by ``init``.
    state: moving statistics as made by ``init``.
    x: input ``[batch, ...]``; bf16/f16 inputs get float32 statistics and
      return their own dtype.
    training: Python bool. True normalizes with batch statistics and updates
      the state, unless ``config.trainable`` is False (Keras' TF2 rule: a
      frozen layer runs in inference mode).
    key: PRNG key passed to ``config.adjustment``.
    axis_name: named axis (or tuple) of ``pmap``/``shard_map``/``vmap`` to
      compute statistics across devices.
    axis_index_groups: optional device groups for ``axis_name``.
    mask: optional boolean (or 0/1) array broadcastable to ``x``; masked-out
      elements do not count in the statistics (they are still normalized).

  Returns:
    ``(y, new_state)``; in inference ``new_state`` is ``state``.
  """
  x = _check_input(x)
  resolved = config.resolve(x.shape)
  _check_variables(config, resolved, params, state, x.shape)
  training = check_training(training)
  weights = _check_mask(mask, x.shape)
  if axis_index_groups is not None:
    axis_index_groups = tuple(tuple(int(i) for i in g)
                              for g in axis_index_groups)
  if not (training and config.trainable):
    return _inference(config, resolved, params, state, x), dict(state)
  if config.virtual_batch_size is not None:
    _check_virtual_batch(config, x.shape)
  if _fast_path_applies(config):
    return _train_fused(config, resolved, params, state, x, weights,
                        axis_name, axis_index_groups)
  return _train_general(config, resolved, params, state, x, weights, key,
                        axis_name, axis_index_groups)


def _fast_path_applies(config: BatchNormConfig) -> bool:
  return (config.fused is not False and not config.renorm
          and config.virtual_batch_size is None and config.adjustment is None)


def _broadcast_params(config, resolved, params, dtype):
  """gamma and beta (None when absent) shaped to broadcast against x."""
  shape = resolved.broadcast_shape
  cast = lambda v: v.reshape(shape).astype(dtype)
  gamma = cast(params["gamma"]) if config.scale else None
  beta = cast(params["beta"]) if config.center else None
  return gamma, beta


def _inference(config, resolved, params, state, x):
  sd = stats.stat_dtype(x.dtype)
  shape = resolved.broadcast_shape
  gamma, beta = _broadcast_params(config, resolved, params, sd)
  a = lax.rsqrt(state["moving_variance"].reshape(shape).astype(sd)
                + jnp.asarray(config.epsilon, sd))
  if gamma is not None:
    a = a * gamma
  return fused_lib.normalize(x, state["moving_mean"].reshape(shape), a, beta)


def _train_fused(config, resolved, params, state, x, weights, axis_name,
                 groups):
  sd = stats.stat_dtype(x.dtype)
  shape = resolved.broadcast_shape
  gamma, beta = _broadcast_params(config, resolved, params, sd)
  scale = gamma if gamma is not None else jnp.ones(shape, sd)
  offset = beta if beta is not None else jnp.zeros(shape, sd)
  y, mean, var, count = fused_lib.normalize_train(
      x, scale, offset, weights, resolved.reduction_axes, config.epsilon,
      axis_name, groups)
  new_state = _update_moving_statistics(config, resolved, state, mean, var,
                                        count)
  return y, new_state


def _updatable(config, resolved, count, mean, var):
  """Per channel: may the moving statistics take this batch's values?

  Never for a channel without valid elements (its statistics are undefined);
  with ``skip_nonfinite_updates`` also not for a non-finite mean or variance,
  so that one bad batch cannot poison the state.
  """
  shape = resolved.param_shape
  valid = jnp.broadcast_to(count, mean.shape).reshape(shape) > 0
  if config.skip_nonfinite_updates:
    valid = valid & jnp.isfinite(mean.reshape(shape)) & jnp.isfinite(
        var.reshape(shape))
  return lax.stop_gradient(valid)


def _update_moving_statistics(config, resolved, state, mean, var, count):
  """EMA updates of the plain (non-renorm) moving statistics."""
  mean, var, count = (lax.stop_gradient(v) for v in (mean, var, count))
  if config.bessel_corrected_moving_variance(resolved):
    var = var * stats.bessel_factor(count)
  valid = _updatable(config, resolved, count, mean, var)
  new_state = dict(state)
  new_state["moving_mean"] = ema(state["moving_mean"], mean, config.momentum,
                                 valid)
  new_state["moving_variance"] = ema(state["moving_variance"], var,
                                     config.momentum, valid)
  return new_state


# ------------------------------------------------------- general training


def _train_general(config, resolved, params, state, x, weights, key,
                   axis_name, groups):
  """Renorm, virtual batches, adjustment and ``fused=False``, by autodiff."""
  sd = stats.stat_dtype(x.dtype)
  xs = x.astype(sd)
  gamma, beta = _broadcast_params(config, resolved, params, sd)
  vbs = config.virtual_batch_size
  if weights is not None:
    weights = jnp.broadcast_to(weights, x.shape).astype(sd)
  if vbs is None:
    red_axes = resolved.reduction_axes
    moments = stats.moments(xs, red_axes, weights=weights,
                            axis_name=axis_name, axis_index_groups=groups)
  else:  # statistics per virtual batch, on a view with two batch axes
    xs, weights, red_axes, group_axis = _virtual_view(config, xs, weights,
                                                      resolved)
    gamma = None if gamma is None else gamma[None]
    beta = None if beta is None else beta[None]
    moments = stats.moments(xs, red_axes, weights=weights)
  batch_mean, batch_var, count = moments
  update_var = batch_var
  if config.bessel_corrected_moving_variance(resolved):
    update_var = batch_var * stats.bessel_factor(count)
  if vbs is not None:
    # Renorm's corrections use these averages too (as Keras does).
    count, batch_mean, batch_var, update_var = _merge_virtual_batches(
        count, (batch_mean, batch_var, update_var), group_axis, axis_name,
        groups)
  scale, offset = gamma, beta
  if config.adjustment is not None:
    adj_scale, adj_bias = _call_adjustment(config.adjustment, xs.shape, key)
    scale, offset = _compose(jnp.asarray(adj_scale, sd),
                             jnp.asarray(adj_bias, sd), scale, offset)
  new_state = dict(state)
  valid = _updatable(config, resolved, count, batch_mean, update_var)
  if config.renorm:
    r, d, renorm_state = _renorm(config, resolved, state, batch_mean,
                                 batch_var, update_var, valid)
    new_state.update(renorm_state)
    if vbs is not None:
      r, d = r[None], d[None]
    scale, offset = _compose(r, d, scale, offset)
  else:
    new_state["moving_variance"] = ema(state["moving_variance"],
                                       lax.stop_gradient(update_var),
                                       config.momentum, valid)
  new_state["moving_mean"] = ema(state["moving_mean"],
                                 lax.stop_gradient(batch_mean),
                                 config.momentum, valid)
  inv = lax.rsqrt(moments.variance + jnp.asarray(config.epsilon, sd))
  if scale is not None:
    inv = inv * scale
  y = fused_lib.normalize(xs, moments.mean, inv, offset)
  return y.reshape(x.shape).astype(x.dtype), new_state


def _virtual_view(config, xs, weights, resolved):
  """Reshapes ``[B, ...]`` to two batch axes; returns the view and its axes.

  Strided (Keras): ``[v, B/v, ...]``, statistics over axis 0, one virtual
  batch per index of axis 1. Contiguous: ``[B/v, v, ...]``, over axis 1.
  """
  vbs = config.virtual_batch_size
  batch = xs.shape[0]
  if config.virtual_batch_layout == "strided":
    view, group_axis, batch_axis = (vbs, batch // vbs), 1, 0
  else:
    view, group_axis, batch_axis = (batch // vbs, vbs), 0, 1
  shape = view + xs.shape[1:]
  red_axes = (batch_axis,) + tuple(a + 1 for a in resolved.reduction_axes
                                   if a != 0)
  if weights is not None:
    weights = weights.reshape(shape)
  return xs.reshape(shape), weights, red_axes, group_axis


def _merge_virtual_batches(count, values, group_axis, axis_name, groups):
  """Per-channel averages over virtual batches (and devices), count-weighted.

  Keras averages the virtual batches' means and variances with equal weights;
  with equal counts (no mask) the count-weighted average is the same. Across
  devices the virtual batches stay local (each device normalizes its own
  virtual batches) and only these averages are combined, in one ``psum``.
  """
  sums = [jnp.sum(count, axis=group_axis, keepdims=True)]
  sums += [jnp.sum(count * v, axis=group_axis, keepdims=True) for v in values]
  packed = jnp.stack(sums)
  if axis_name is not None:
    packed = lax.psum(packed, axis_name, axis_index_groups=groups)
  packed = jnp.squeeze(packed, axis=group_axis + 1)
  total = packed[0]
  return (total,) + tuple(stats.safe_divide(v, total) for v in packed[1:])


def _compose(scale, offset, then_scale, then_offset):
  """The affine map ``z -> (z * scale + offset) * then_scale + then_offset``.

  ``None`` stands for the identity factor/term (Keras' ``_compose_transforms``).
  """
  if then_scale is not None:
    scale = scale * then_scale
    offset = offset * then_scale
  if then_offset is not None:
    offset = offset + then_offset
  return scale, offset


def _call_adjustment(adjustment, shape, key):
  try:
    nparams = len([
        p for p in inspect.signature(adjustment).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty])
  except (TypeError, ValueError):
    nparams = 2
  result = adjustment(shape) if nparams == 1 else adjustment(shape, key)
  if not (isinstance(result, (tuple, list)) and len(result) == 2):
    raise TypeError(
        "`adjustment(shape, key)` must return a pair (scale, bias) of arrays "
        f"broadcastable to the input; got {type(result).__name__}.")
  return result


def _clip_bound(bound, step):
  if bound is None:
    return None
  return bound(step) if callable(bound) else bound


def _renorm(config, resolved, state, batch_mean, batch_var, update_var, valid):
  """Keras' renorm corrections and the updates of every renorm statistic."""
  eps = config.epsilon
  shape = resolved.param_shape
  batch_mean = lax.stop_gradient(batch_mean)
  batch_std = jnp.sqrt(lax.stop_gradient(batch_var) + eps)
  sigma = jnp.maximum(state["renorm_stddev"], jnp.sqrt(eps))
  renorm_mean = state["renorm_mean"]
  bshape = batch_mean.shape
  r = batch_std / sigma.reshape(bshape)
  d = (batch_mean - renorm_mean.reshape(bshape)) / sigma.reshape(bshape)
  clipping = config.renorm_clipping
  new = {}
  if clipping is not None:
    step = state.get("renorm_step")
    rmin = _clip_bound(clipping.rmin, step)
    rmax = _clip_bound(clipping.rmax, step)
    dmax = _clip_bound(clipping.dmax, step)
    if rmin is not None:
      r = jnp.maximum(r, rmin)
    if rmax is not None:
      r = jnp.minimum(r, rmax)
    if dmax is not None:
      d = jnp.clip(d, -dmax, dmax)
    if step is not None:
      new["renorm_step"] = step + 1
  momentum, renorm_momentum = config.momentum, config.renorm_momentum
  new["renorm_mean"] = ema(renorm_mean, batch_mean.reshape(shape),
                           renorm_momentum, valid)
  new["renorm_stddev"] = ema(state["renorm_stddev"], batch_std.reshape(shape),
                             renorm_momentum, valid)
  update_std = jnp.sqrt(lax.stop_gradient(update_var) + eps).reshape(shape)
  moving_stddev = ema(state["moving_stddev"], update_std, momentum, valid)
  new["moving_stddev"] = moving_stddev
  new["moving_variance"] = jnp.where(
      valid, jnp.maximum(moving_stddev * moving_stddev - eps, 0.0),
      state["moving_variance"])
  return lax.stop_gradient(r), lax.stop_gradient(d), new


# ---------------------------------------------------------------- checks


def _check_param_dtype(dtype):
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"`dtype` of the variables must be a float dtype; got "
                    f"{dtype!r}. Use jnp.float32.")


def _check_input(x):
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"BatchNormalization expects a floating-point input; got dtype "
        f"{x.dtype} (shape {tuple(x.shape)}). Cast it, e.g. "
        "x.astype(jnp.float32).")
  return x


def check_training(training) -> bool:
  """``training`` as a Python bool, or a TypeError explaining why not."""
  if isinstance(training, (bool, np.bool_, type(None))):
    return bool(training)
  if isinstance(training, int) and training in (0, 1):
    return bool(training)
  if isinstance(training, jax.Array) and not isinstance(training,
                                                        jax.core.Tracer):
    if training.shape == () and training.dtype == jnp.bool_:
      return bool(training)
  raise TypeError(
      f"`training` must be a Python bool; got {type(training).__name__}. "
      "Under jax.jit mark it static (static_argnames=('training',)): "
      "training and inference are different programs.")


def _check_mask(mask, shape):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  try:
    jnp.broadcast_shapes(mask.shape, shape)
  except ValueError:
    raise ValueError(
        f"`mask` of shape {tuple(mask.shape)} does not broadcast to the input "
        f"shape {tuple(shape)}. For a Keras sequence mask of shape "
        "(batch, time) add a trailing axis: mask[..., None].") from None
  if jnp.broadcast_shapes(mask.shape, shape) != tuple(shape):
    raise ValueError(
        f"`mask` of shape {tuple(mask.shape)} would enlarge the input shape "
        f"{tuple(shape)}; it must be broadcastable *to* the input.")
  if mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer):
    return mask.astype(stats.stat_dtype(jnp.float32))
  if jnp.issubdtype(mask.dtype, jnp.floating):
    return mask.astype(jnp.float32)
  raise TypeError(f"`mask` must be boolean (or 0/1 numbers); got dtype "
                  f"{mask.dtype}.")


def _check_variables(config, resolved, params, state, input_shape):
  expected = resolved.param_shape
  needed = [("params", "gamma", config.scale), ("params", "beta", config.center)]
  for kind, name, present in needed:
    tree = params if kind == "params" else state
    if present and name not in tree:
      raise ValueError(
          f"`{kind}` has no '{name}', but the config has "
          f"{'scale' if name == 'gamma' else 'center'}=True. Create params "
          "with jaxbn.init(config, x.shape).")
  for tree, names in ((params, ("gamma", "beta")),
                      (state, ("moving_mean", "moving_variance"))):
    for name in names:
      if name in tree and tuple(tree[name].shape) != tuple(expected):
        raise ValueError(
            f"'{name}' has shape {tuple(tree[name].shape)} but an input of "
            f"shape {tuple(input_shape)} with axis={config.axis!r} needs "
            f"{tuple(expected)} "
            f"(resolved channel axes {resolved.axes}). The input's channel "
            "count does not match the layer's variables: check `axis` and the "
            "input layout.")
  if config.renorm:
    missing = [k for k in ("moving_stddev", "renorm_mean", "renorm_stddev")
               if k not in state]
    if missing:
      raise ValueError(
          f"renorm=True needs state entries {missing}; create the state with "
          "jaxbn.init using the same config.")
    if (config.renorm_clipping is not None
        and config.renorm_clipping.is_scheduled
        and "renorm_step" not in state):
      raise ValueError(
          "`renorm_clipping` has a scheduled bound, which needs "
          "state['renorm_step']; create the state with jaxbn.init using the "
          "same config.")


def _check_virtual_batch(config, shape):
  vbs = config.virtual_batch_size
  if shape[0] % vbs:
    raise ValueError(
        f"The training batch size {shape[0]} is not a multiple of "
        f"`virtual_batch_size`={vbs}. Use a batch size divisible by {vbs}, or "
        "drop the remainder rows (inference accepts any batch size).")
