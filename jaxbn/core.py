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

Every training configuration runs through one custom VJP with the closed-form
backward (``jaxbn.closed_form``): the virtual batches as a view of ``x``
(``_batch_view``), renorm's ``r``/``d`` from the statistics inside its forward
(``_corrections``), adjustment folded into gamma and beta; ``fused=False``
runs the same forward by plain autodiff.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import affine, closed_form, eager, modes, stats
from jaxbn.config import (ACCUMULATION_STEP, ACCUMULATOR_NAMES,
                          BatchNormConfig, check_input, check_mask,
                          check_param_dtype, check_training, check_trees,
                          check_variables, check_virtual_batch, state_names)
from jaxbn.moving_averages import ema

Params = dict
State = dict


# --------------------------------------------------------------------- init


def variable_shape(config: BatchNormConfig, input_shape) -> tuple:
  """Keras' shape of every variable for inputs of ``input_shape``."""
  return config.resolve(input_shape).param_shape


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
  """Moving statistics (and renorm statistics) from the config.

  The statistics are float32 at least (``dtype`` float64 keeps float64): in
  float16 or bfloat16 an update ``(1 - momentum) * (mean - moving_mean)``
  smaller than half an ulp of the average rounds away and the average
  stalls.
  """
  dtype = state_dtype(dtype)
  keys = _split(key, 2)
  mean = config.moving_mean_initializer(keys[0], param_shape, dtype)
  variance = config.moving_variance_initializer(keys[1], param_shape, dtype)
  stddev = lambda: jnp.sqrt(variance)
  initial = {"moving_mean": lambda: mean, "moving_variance": lambda: variance,
             "moving_stddev": stddev, "renorm_mean": lambda: mean,
             "renorm_stddev": stddev,
             "renorm_step": lambda: jnp.zeros((), jnp.int32)}
  # which entries exist is state_names' decision alone
  names = state_names(config)
  state = {name: initial[name]() for name in names if name in initial}
  if ACCUMULATION_STEP in names:
    state.update(_empty_accumulator(param_shape, dtype))
  return state


def _empty_accumulator(param_shape, dtype) -> dict:
  zeros = jnp.zeros(param_shape, dtype)
  accumulator = dict(zip(ACCUMULATOR_NAMES, (
      zeros, zeros, zeros, zeros, jnp.ones(param_shape, dtype))))
  accumulator[ACCUMULATION_STEP] = jnp.zeros((), jnp.int32)
  return accumulator


def state_dtype(dtype) -> jnp.dtype:
  """The dtype of the moving statistics for variables of ``dtype``: float32,
  or float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def init(config: BatchNormConfig, input_shape, *, key=None,
         dtype=jnp.float32) -> tuple[Params, State]:
  """Creates ``(params, state)`` for inputs of ``input_shape``.

  Args:
    config: the layer's arguments.
    input_shape: shape of an input batch (only the rank and channel sizes
      matter).
    key: PRNG key, needed only by random initializers.
    dtype: dtype of the variables (float32 unless you need float64); the
      moving statistics are float32 at least (``init_state``).
  """
  check_param_dtype(dtype)
  param_shape = variable_shape(config, input_shape)
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
    mask: optional boolean array (numbers: nonzero is valid) of ``x``'s
      shape or a prefix of it (``(batch,)``, ``(batch, time)``: aligned with
      the leading axes, as in Keras), 1 along axes it does not vary over.
      Masked-out elements are padding: normalized like the rest, but they
      never reach the statistics or any gradient, whatever they hold.

  Returns:
    ``(y, new_state)``; in inference ``new_state`` is ``state``.
  """
  x = check_input(x)
  resolved = config.resolve(x.shape)
  params, state = check_trees(params, state)
  check_variables(config, resolved, params, state, x.shape)
  training = check_training(training)
  weights = check_mask(mask, x.shape)
  if axis_index_groups is not None:
    axis_index_groups = tuple(tuple(int(i) for i in g)
                              for g in axis_index_groups)
  if not (training and config.trainable):
    if modes.outside_any_trace(params, state, x):
      return eager.call(_inference, config, resolved, params, state,
                        x), dict(state)
    return _inference(config, resolved, params, state, x), dict(state)
  if config.virtual_batch_size is not None:
    check_virtual_batch(config, x.shape)
  if x.size == 0:
    # nothing to normalize, and no element for the statistics: the state
    # stays (as for a channel without a valid element); every device of a
    # mapped axis has the same empty shape, so no collective is skipped
    return jnp.zeros_like(x), dict(state)
  # eager calls with axis_name (which only a transformation binds) or with
  # an adjustment callable (which may draw from Python state on every call)
  # stay op by op
  if (axis_name is None and config.adjustment is None
      and modes.outside_any_trace(params, state, x, weights, key)):
    return eager.call(_train, config, resolved, params, state, x, weights,
                      key, stats.Devices())
  return _train(config, resolved, params, state, x, weights, key,
                stats.Devices(axis_name, axis_index_groups))


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
  a = affine.inverse_std(state["moving_variance"].reshape(shape).astype(sd),
                         config.epsilon)
  if gamma is not None:
    a = a * gamma
  return affine.normalize(x, state["moving_mean"].reshape(shape), a, beta,
                          config.activation)


# ----------------------------------------------------------------- training


class BatchView(NamedTuple):
  """What the statistics are taken over: ``x`` (a view of it with virtual
  batches), its weights and reduction axes, and the virtual batches' axis."""

  x: jax.Array
  weights: jax.Array | None
  reduction_axes: tuple
  group_axis: int | None


class Pooled(NamedTuple):
  """A batch's statistics for the state, per channel (over virtual batches
  and devices), before they leave units: variances in units of ``unit^2``,
  ``inv_unit`` None without units (see ``stats.in_units``)."""

  count: jax.Array
  mean: jax.Array
  variance: jax.Array
  update_variance: jax.Array  # what moving_variance follows (Bessel or not)
  inv_unit: jax.Array | None


class Summary(NamedTuple):
  """The batch's statistics for the state (over virtual batches and devices)."""

  count: jax.Array
  mean: jax.Array
  update_variance: jax.Array  # what moving_variance follows (Bessel or not)
  # renorm's sqrt(variance + epsilon) of the batch's variance and of the
  # update variance, formed in units: representable where the variance
  # saturates (a spread beyond about 1.8e19); None without renorm
  stddev: jax.Array | None
  update_stddev: jax.Array | None


def _train(config, resolved, params, state, x, weights, key,
           devices: stats.Devices):
  """Every training configuration, through ``closed_form``."""
  sd = stats.stat_dtype(x.dtype)
  shape = resolved.broadcast_shape
  gamma, beta = _broadcast_params(config, resolved, params, sd)
  scale = gamma if gamma is not None else jnp.ones(shape, sd)
  offset = beta if beta is not None else jnp.zeros(shape, sd)
  per_channel_adjustment = True
  if config.adjustment is not None:
    adj_scale, adj_bias = _call_adjustment(config.adjustment, x.shape, key)
    per_channel_adjustment = all(
        _broadcasts_per_channel(jnp.shape(v), shape) for v in
        (adj_scale, adj_bias))
    scale, offset = affine.compose(jnp.asarray(adj_scale, sd),
                                   jnp.asarray(adj_bias, sd), scale, offset)
  batch = _batch_view(config, resolved, x, weights)
  if batch.group_axis is not None:  # parameters broadcast over the groups
    scale, offset = scale[None], offset[None]
  # Virtual batches are normalized each on its own device; only the summary
  # for the state crosses devices.
  plan = closed_form.TrainingPlan(
      batch.reduction_axes, config.epsilon,
      devices if batch.group_axis is None else stats.Devices(),
      functools.partial(_corrections, config, resolved, batch.group_axis,
                        devices),
      config.activation)
  args = (batch.x, scale, offset, batch.weights,
          _renorm_inputs(config, state), plan)
  if config.fused is False or not per_channel_adjustment:
    y, _, (pooled, summary) = closed_form.reference(*args)
  else:
    y, _, (pooled, summary) = closed_form.train(*args)
  return stats.view_of(y, x.shape), _updated_state(config, resolved, state,
                                                   pooled, summary)


def _broadcasts_per_channel(value_shape, channel_shape):
  """Whether a value of ``value_shape`` varies only over the channel axes."""
  if len(value_shape) > len(channel_shape):
    return False
  padded = (1,) * (len(channel_shape) - len(value_shape)) + tuple(value_shape)
  return all(v in (1, c) for v, c in zip(padded, channel_shape))


def _batch_view(config, resolved, x, weights) -> BatchView:
  """``x`` as the statistics see it.

  Virtual batches (``virtual_batch_size = v``) reshape ``[B, ...]`` to two
  batch axes: strided (Keras) ``[v, B/v, ...]`` with virtual batch g at
  index g of axis 1; contiguous ``[B/v, v, ...]`` with it at index g of axis
  0. The group axis is kept by the reduction, so each virtual batch gets its
  own statistics: a batch norm over a view with one more kept axis.
  """
  vbs = config.virtual_batch_size
  if vbs is None:
    return BatchView(x, weights, resolved.reduction_axes, None)
  batch = x.shape[0]
  if config.virtual_batch_layout == "strided":
    batch_axes, group_axis, batch_axis = (vbs, batch // vbs), 1, 0
  else:
    batch_axes, group_axis, batch_axis = (batch // vbs, vbs), 0, 1
  shape = batch_axes + x.shape[1:]
  axes = (batch_axis,) + tuple(a + 1 for a in resolved.reduction_axes if a)
  if weights is not None:  # split the batch axis like x's; others as given
    weights = weights.reshape((1,) * (x.ndim - weights.ndim) + weights.shape)
    weights = jnp.broadcast_to(weights, x.shape[:1] + weights.shape[1:])
    weights = weights.reshape(batch_axes + weights.shape[1:])
  return BatchView(stats.view_of(x, shape), weights, axes, group_axis)


def _corrections(config, resolved, group_axis, devices,
                 batch: stats.InUnits, renorm_inputs):
  """``(r, d, (pooled, summary))`` from the normalization statistics
  ``batch`` (see ``stats.in_units``).

  Runs inside the forward of ``closed_form``: ``r``/``d`` are renorm's
  corrections (None without renorm), ``pooled`` the statistics the state
  follows (:class:`Pooled`) and ``summary`` those in plain units where renorm
  formed them (None without renorm).
  """
  pooled = _pool(config, resolved, group_axis, devices, batch)
  if not config.renorm:
    return None, None, (pooled, None)
  summary = _summary(config, pooled)
  r, d = _renorm_corrections(config, summary, *renorm_inputs)
  if group_axis is not None:
    r, d = r[None], d[None]
  return r, d, (pooled, summary)


def _pool(config, resolved, group_axis, devices,
          batch: stats.InUnits) -> Pooled:
  """The batch's statistics for the state, without gradient.

  With virtual batches, the count-weighted averages of the virtual batches'
  means and variances, over every device (Keras averages them with equal
  weights; without a mask the counts are equal), with the Bessel correction
  applied per virtual batch.
  """
  count, mean, var, inv_unit = lax.stop_gradient(tuple(batch))
  bessel = resolved.bessel
  count = jnp.broadcast_to(count, mean.shape)
  if group_axis is None:
    update = var * stats.bessel_factor(count) if bessel else var
    return Pooled(count, mean, var, update, inv_unit)
  return _merged(Pooled(count, mean, var, var * stats.bessel_factor(count)
                        if bessel else var, inv_unit), group_axis, devices)


def _merged(pooled: Pooled, axis: int,
            devices: stats.Devices = stats.Devices()) -> Pooled:
  """The count-weighted merge of ``pooled``'s groups along ``axis`` (and
  over the devices of ``axis_name``): the means' average and the average of
  the variances (``stats.merge`` without its between-groups term)."""
  count, mean, var, update_var, inv_unit = pooled
  m2, update_m2 = var * count, update_var * count
  if inv_unit is not None:
    inv_unit = jnp.broadcast_to(inv_unit, mean.shape)
  count, mean, m2, update_m2, inv_unit = stats.merge(
      count, mean, m2, axis, between=False, pooled=(update_m2,),
      inv_unit=inv_unit)
  if devices.axis_name is not None:
    count, mean, m2, update_m2, inv_unit = stats.merge_across_devices(
        count, mean, m2, devices.axis_name, devices.groups, between=False,
        pooled=(update_m2,), inv_unit=inv_unit)
  return Pooled(count, mean, stats.safe_divide(m2, count),
                stats.safe_divide(update_m2, count), inv_unit)


def _summary(config, pooled: Pooled) -> Summary:
  """``pooled``'s update variance in plain units (saturated beyond
  float32's range: ``stats.unscaled_variance``), with renorm's standard
  deviations formed in units (representable where the variance
  saturates)."""
  count, mean, var, update_var, inv_unit = pooled
  stddevs = (None, None)
  if config.renorm:
    stddevs = (affine.stddev(var, config.epsilon, inv_unit),
               affine.stddev(update_var, config.epsilon, inv_unit))
  return Summary(count, mean, stats.unscaled_variance(update_var, inv_unit),
                 *stddevs)


def _updated_state(config, resolved, state, pooled: Pooled,
                   summary: Summary | None) -> State:
  """The state after a training call: the moving statistics' EMA step from
  this call's statistics (``summary``, formed from ``pooled`` where renorm
  has not already), or with ``accumulation_steps``
  :func:`_accumulated_state`."""
  shape = resolved.param_shape
  as_variables = lambda values: type(values)(*(
      None if v is None else
      jnp.broadcast_to(v, values.mean.shape).reshape(shape) for v in values))
  if config.accumulation_steps > 1:
    return _accumulated_state(config, state, as_variables(pooled))
  if summary is None:
    summary = _summary(config, pooled)
  return _averaged_state(config, state, as_variables(summary))


def _accumulated_state(config, state, pooled: Pooled) -> State:
  """``pooled`` merged into the accumulator (:func:`_merged`, the virtual
  batches' rule); on every ``accumulation_steps``-th call the EMA step from
  the merge, and the accumulator emptied. Selected per call with
  ``jnp.where`` (the step counter is data), so no conditional."""
  accumulator = Pooled(*(state[n] for n in ACCUMULATOR_NAMES))
  if pooled.inv_unit is None:  # no units (guard off): the stored ones are 1
    accumulator = accumulator._replace(inv_unit=None)
  both = Pooled(*(None if a is None else jnp.stack(
      [jnp.asarray(a, pooled.mean.dtype), b]) for a, b in zip(accumulator,
                                                              pooled)))
  merged = _merged(both, axis=0)
  step = state[ACCUMULATION_STEP] + 1
  last = step >= config.accumulation_steps
  averaged = _averaged_state(config, state, _summary(config, merged))
  new_state = {n: jnp.where(last, averaged[n], v) for n, v in state.items()}
  empty = _empty_accumulator(pooled.mean.shape, state["moving_mean"].dtype)
  if merged.inv_unit is None:
    merged = merged._replace(inv_unit=empty["accumulated_inv_unit"])
  for name, value in zip(ACCUMULATOR_NAMES, merged):
    new_state[name] = jnp.where(last, empty[name],
                                value.astype(state[name].dtype))
  new_state[ACCUMULATION_STEP] = jnp.where(last, 0, step).astype(jnp.int32)
  return new_state


def _averaged_state(config, state, summary: Summary) -> State:
  """The EMA updates of every moving statistic (plain and renorm).

  A channel keeps its statistics where ``_updatable`` says so.
  """
  count, mean, update_var, stddev, update_stddev = summary
  valid = _updatable(config, count, mean, update_var)
  new_state = dict(state)
  new_state["moving_mean"] = ema(state["moving_mean"], mean, config.momentum,
                                 valid)
  if not config.renorm:
    new_state["moving_variance"] = ema(state["moving_variance"], update_var,
                                       config.momentum, valid)
    return new_state
  eps = config.epsilon
  new_state["renorm_mean"] = ema(state["renorm_mean"], mean,
                                 config.renorm_momentum, valid)
  new_state["renorm_stddev"] = ema(state["renorm_stddev"], stddev,
                                   config.renorm_momentum, valid)
  moving_stddev = ema(state["moving_stddev"], update_stddev, config.momentum,
                      valid)
  new_state["moving_stddev"] = moving_stddev
  new_state["moving_variance"] = jnp.where(
      valid, stats.saturated(
          stats.nonnegative(moving_stddev * moving_stddev - eps), moving_stddev),
      state["moving_variance"])
  if "renorm_step" in state:
    new_state["renorm_step"] = state["renorm_step"] + 1
  return new_state


def _updatable(config, count, mean, var):
  """Per channel: may the moving statistics take this batch's values?

  Never for a channel without valid elements (its statistics are undefined);
  with ``skip_nonfinite_updates`` also not for a non-finite mean or variance,
  so that one bad batch cannot poison the state.
  """
  valid = count > 0
  if config.skip_nonfinite_updates:
    valid = valid & jnp.isfinite(mean) & jnp.isfinite(var)
  return valid


_NO_ADJUSTMENT_KEY = (
    "`adjustment(shape, key)` failed with key=None: no key was given. Pass "
    "key=jax.random.key(...) to jaxbn.apply (a new key each step); give "
    "the Linen layer an 'adjustment' stream (model.apply(..., "
    "rngs={'adjustment': key})) and the NNX layer one in its rngs "
    "(nnx.Rngs(params=0, adjustment=1)). An adjustment without randomness "
    "can take (shape) alone.")


def _call_adjustment(adjustment, shape, key):
  try:
    nparams = len([
        p for p in inspect.signature(adjustment).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty])
  except (TypeError, ValueError):
    nparams = 2
  if nparams == 1:
    result = adjustment(shape)
  else:
    try:
      result = adjustment(shape, key)
    except Exception as error:  # most likely drawing from the missing key
      if key is not None:
        raise
      raise ValueError(_NO_ADJUSTMENT_KEY) from error
  if not (isinstance(result, (tuple, list)) and len(result) == 2):
    raise TypeError(
        "`adjustment(shape, key)` must return a pair (scale, bias) of arrays "
        f"broadcastable to the input; got {type(result).__name__}.")
  for name, value in zip(("scale", "bias"), result):
    try:
      jnp.broadcast_shapes(jnp.shape(value), tuple(shape))
    except ValueError:
      raise ValueError(
          f"`adjustment` returned a {name} of shape {jnp.shape(value)}, which "
          f"does not broadcast to the input shape {tuple(shape)}. Return "
          "per-channel arrays, e.g. of shape (C,) for channels last.") from None
  return result


# ------------------------------------------------------------------ renorm


def _renorm_inputs(config, state):
  """What renorm's corrections read: the averages from before this step and
  the clipping bounds (a schedule's value at the state's step)."""
  if not config.renorm:
    return ()
  clipping = config.renorm_clipping
  bounds = (None, None, None)
  if clipping is not None:
    step = state.get("renorm_step")
    bounds = tuple(
        None if bound is None else
        jnp.asarray(bound(step) if callable(bound) else bound, jnp.float32)
        for bound in (clipping.rmin, clipping.rmax, clipping.dmax))
  return (state["renorm_mean"], state["renorm_stddev"]) + bounds


def _renorm_corrections(config, summary, renorm_mean, renorm_stddev, rmin,
                        rmax, dmax):
  """Keras' Batch Renorm corrections ``r`` and ``d`` (no gradient).

  With ``s = sqrt(var + epsilon)`` and ``sigma = max(renorm_stddev,
  sqrt(epsilon))``: ``r = clip(s / sigma, rmin, rmax)``, ``d = clip((mean -
  renorm_mean) / sigma, -dmax, dmax)``.
  """
  eps = config.epsilon
  shape = summary.mean.shape
  sigma = stats.clamp(renorm_stddev, low=jnp.sqrt(eps)).reshape(shape)
  r = summary.stddev / sigma
  d = (summary.mean - renorm_mean.reshape(shape)) / sigma
  r = stats.clamp(r, rmin, rmax)  # a NaN stays NaN
  if dmax is not None:
    d = stats.clamp(d, -dmax, dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)
