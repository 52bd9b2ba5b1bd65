"""Population statistics (Precise BN): exact moving statistics after training.

The moving averages of a trained network lag behind its final weights (and
mean nothing after SWA/EMA weight averaging, schedule-free training or a
domain shift). With the weights frozen, ``precise_statistics`` runs N batches
through the model, records the batch statistics of the input of every batch
norm (jaxbn's and flax's) and replaces its moving statistics with

* ``method='all_samples'`` (default): the mean and variance of all samples
  pooled: Chan's merge of the per-batch ``(count, mean, M2)`` in float64,
  exact whatever the batch sizes, masks included; or
* ``method='mean_of_batches'``: the plain average over batches of the
  per-batch means and variances (fvcore's PreciseBN),

the variance following each layer's estimator (a jaxbn layer's
``moving_variance_estimator``; flax's layers keep a biased variance). Batches
may be global arrays sharded over devices: their statistics are those of the
whole (global) batch.

Models: Linen (``precise_statistics(model, variables, batches)`` returns new
variables), NNX (``precise_statistics(model, batches=batches)`` updates the
model in place) and the functional API (``precise_statistics(config, state,
batches)``, the batches being the layer's inputs, returns the new state).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from jaxbn import stats as stats_lib
from jaxbn import linen as jaxbn_linen
from jaxbn.config import BatchNormConfig
from jaxbn.interop.flax_models import as_jaxbn_mask, flax_config

METHODS = ("all_samples", "mean_of_batches")
_COLLECTION = "jaxbn_batch_moments"


class Target(NamedTuple):
  """Where a layer's population statistics go: the names of its mean and
  variance (and of jaxbn's renorm ``moving_stddev``), whether the variance is
  Bessel-corrected, and epsilon for the standard deviation."""

  mean: str
  variance: str
  bessel: bool
  epsilon: float = 0.0
  stddev: str | None = None


def _jaxbn_target(config: BatchNormConfig, input_shape) -> Target:
  resolved = config.resolve(input_shape)
  return Target("moving_mean", "moving_variance",
                resolved.bessel,
                config.epsilon, "moving_stddev" if config.renorm else None)


FLAX_TARGET = Target("mean", "var", bessel=False)


def _moments(x, mask, reduction_axes, param_shape):
  """``(count, mean, M2, inv_unit)`` of ``x`` over ``reduction_axes`` (the
  overflow guard's units, ``stats.in_units``), shaped ``param_shape``."""
  sd = stats_lib.stat_dtype(x.dtype)
  weights = None if mask is None else jnp.broadcast_to(
      jnp.asarray(mask, sd).reshape(
          jnp.shape(mask) + (1,) * (x.ndim - jnp.ndim(mask))), x.shape)
  (count, mean, m2), inv_unit = stats_lib.in_units(
      stats_lib.local_moments, x.astype(sd), reduction_axes, weights)
  if inv_unit is None:  # the overflow guard is off: no units
    inv_unit = jnp.ones_like(mean)
  count = jnp.broadcast_to(count, mean.shape)
  return tuple(v.reshape(param_shape) for v in (count, mean, m2, inv_unit))


def _jaxbn_layer_moments(config, x, mask):
  resolved = config.resolve(jnp.shape(x))
  return (_moments(x, mask, resolved.reduction_axes, resolved.param_shape),
          _jaxbn_target(config, jnp.shape(x)))


def _flax_layer_moments(bn, x, mask):
  """A flax batch norm's input moments, its axes read as ``jaxbn``'s (and its
  mask, broadcast from the trailing axes, as jaxbn's)."""
  moments, _ = _jaxbn_layer_moments(flax_config(bn), x,
                                    as_jaxbn_mask(mask, jnp.asarray(x)))
  return moments, FLAX_TARGET


def _nnx_layers() -> tuple:
  """``(jaxbn's NNX layer, nnx.BatchNorm)`` once flax.nnx is imported, else
  ``()``: an NNX model exists only then, and importing flax.nnx for a Linen
  or functional user would cost a third of jaxbn's import time."""
  if "flax.nnx" not in sys.modules:
    return ()
  from flax import nnx
  from jaxbn import nnx as jaxbn_nnx
  return jaxbn_nnx.BatchNormalization, nnx.BatchNorm


def _layer_moments(module, x, mask):
  """The moments of a batch-norm layer's input and their :class:`Target`,
  or None for any other module."""
  nnx_layers = _nnx_layers()
  if isinstance(module, (jaxbn_linen.BatchNormalization, *nnx_layers[:1])):
    return _jaxbn_layer_moments(module.config, x, mask)
  if isinstance(module, (nn.BatchNorm, *nnx_layers[1:])):
    return _flax_layer_moments(module, x, mask)
  return None


def _input_and_mask(args, kwargs):
  x = args[0] if args else kwargs["x"]
  mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
  return x, mask


# ------------------------------------------------------------------ models


def precise_statistics(model, variables=None, batches: Iterable | None = None,
                       *, method: str = "all_samples",
                       num_batches: int | None = None, progress: bool = True,
                       **call_kwargs):
  """Exact moving statistics for every batch norm of a model.

  Args:
    model: a Linen module, an NNX module, or a ``jaxbn.BatchNormConfig``
      (the functional API). Batch norms: ``jaxbn.BatchNormalization``, jaxbn's
      NNX layer, ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm``.
    variables: Linen: the model's variables (``params``, ``batch_stats``),
      unchanged; functional: the layer's state; NNX: omitted.
    batches: the model's inputs (an array, or a tuple of positional
      arguments); for a config, the layer's inputs ``x`` or ``(x, mask)``.
    method: ``'all_samples'`` or ``'mean_of_batches'``.
    num_batches: stop after this many batches.
    progress: show a progress bar.
    **call_kwargs: passed to the model call (e.g. ``training=True``; the
      layers' inputs are what they receive in that call).

  Returns:
    For Linen, the variables with new ``batch_stats``; for NNX, the model,
    updated in place; for the functional API, the new state.
  """
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
  if batches is None:
    raise TypeError("precise_statistics needs `batches` (the model's "
                    "inputs); e.g. precise_statistics(model, variables, "
                    "batches) for Linen, (model, batches=...) for NNX.")
  if isinstance(model, BatchNormConfig):
    return _functional(model, variables, batches, method, num_batches,
                       progress)
  if _nnx_layers() and isinstance(model, sys.modules["flax.nnx"].Module):
    if variables is not None:
      raise TypeError("An NNX model holds its variables: call "
                      "precise_statistics(model, batches=batches).")
    return _nnx(model, batches, method, num_batches, progress, call_kwargs)
  if isinstance(model, nn.Module):
    if variables is None:
      raise TypeError("A Linen model needs its variables: call "
                      "precise_statistics(model, variables, batches).")
    return _linen(model, variables, batches, method, num_batches, progress,
                  call_kwargs)
  raise TypeError(
      "`model` must be a flax.linen Module, a flax.nnx Module or a "
      f"jaxbn.BatchNormConfig; got {type(model).__name__}.")


def _linen(model, variables, batches, method, num_batches, progress,
           call_kwargs):
  targets = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      found = _layer_moments(context.module, *_input_and_mask(args, kwargs))
      if found is not None:
        moments, targets[context.module.scope.path] = found
        context.module.sow(_COLLECTION, "moments", moments)
    return next_fun(*args, **kwargs)

  @jax.jit
  def moments_of(args):
    with nn.intercept_methods(interceptor):
      _, sown = model.apply(variables, *args, mutable=True, **call_kwargs)
    return {path: _at(sown[_COLLECTION], path)["moments"][0]
            for path in targets}

  history = _history(moments_of, batches, num_batches, progress)
  new_stats = unfreeze(jax.tree.map(np.asarray, variables["batch_stats"]))
  for path, moments in history.items():
    _write(_at(new_stats, path), targets[path], moments, method)
  return {**variables, "batch_stats": new_stats}


def _at(tree, path):
  for name in path:
    tree = tree[name]
  return tree


@contextlib.contextmanager
def _recording(paths: dict, found: dict):
  """While active, a call of jaxbn's NNX layer or ``nnx.BatchNorm`` whose
  id is in ``paths`` records its input's moments in ``found[path]``."""
  originals = {cls: cls.__call__ for cls in _nnx_layers()}

  def recorded(original):
    def call(self, *args, **kwargs):
      if id(self) in paths:
        found[paths[id(self)]] = _layer_moments(
            self, *_input_and_mask(args, kwargs))
      return original(self, *args, **kwargs)
    return call

  try:
    for cls, original in originals.items():
      cls.__call__ = recorded(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def _nnx(model, batches, method, num_batches, progress, call_kwargs):
  from flax import nnx
  graphdef, state = nnx.split(model)
  targets = {}

  @jax.jit
  def moments_of(state, args):
    copy = nnx.merge(graphdef, state)
    paths = {id(module): path for path, module in nnx.iter_modules(copy)}
    found = {}
    with _recording(paths, found):
      copy(*args, **call_kwargs)
    for path, (moments, target) in found.items():
      targets[path] = target
    return {path: moments for path, (moments, _) in found.items()}

  history = _history(lambda args: moments_of(state, args), batches,
                     num_batches, progress)
  modules = dict(nnx.iter_modules(model))
  for path, moments in history.items():
    module = modules[path]
    values = {name: getattr(module, name)[...] for name in
              (targets[path].mean, targets[path].variance,
               targets[path].stddev) if name}
    _write(values, targets[path], moments, method)
    for name, value in values.items():
      getattr(module, name)[...] = jnp.asarray(value)
  return model


def _functional(config, state, batches, method, num_batches, progress):
  if state is None:
    raise TypeError("The functional form needs the layer's state: "
                    "precise_statistics(config, state, batches).")
  targets = {}

  @jax.jit
  def moments_of(args):
    x, mask = (args + (None,))[:2]
    moments, targets[()] = _jaxbn_layer_moments(config, x, mask)
    return {(): moments}

  history = _history(moments_of, batches, num_batches, progress)
  new_state = {n: np.asarray(v) for n, v in state.items()}
  _write(new_state, targets[()], history[()], method)
  return {n: jnp.asarray(v) for n, v in new_state.items()}


# ---------------------------------------------------------------- batches


def _history(moments_of: Callable, batches, num_batches, progress) -> dict:
  """Per layer path, the list of its per-batch moments (NumPy)."""
  from tqdm.auto import tqdm  # the progress bar only where one is drawn
  history = {}
  for seen, batch in enumerate(tqdm(batches, total=num_batches,
                                    desc="precise BN",
                                    disable=not progress)):
    if num_batches is not None and seen >= num_batches:
      break
    args = batch if isinstance(batch, tuple) else (batch,)
    for path, moments in moments_of(args).items():
      history.setdefault(path, []).append(
          tuple(np.asarray(v, np.float64) for v in moments))
  if not history:
    raise ValueError("precise_statistics needs at least one batch, and a "
                     "model with at least one batch norm that the batches "
                     "reach.")
  return history


def _write(values: dict, target: Target, history, method):
  """Puts the population statistics of ``history`` into ``values``, in the
  dtype of what they replace."""
  mean, var = _combine(history, method, target.bessel)
  dtype = np.asarray(values[target.mean]).dtype
  shape = np.shape(values[target.mean])
  # a variance beyond float32's range saturates, as in training
  values[target.mean] = mean.reshape(shape).astype(dtype)
  values[target.variance] = np.minimum(
      var, np.finfo(np.float32).max).reshape(shape).astype(dtype)
  if target.stddev is not None:
    values[target.stddev] = np.sqrt(var + target.epsilon).reshape(
        shape).astype(dtype)


def _combine(history, method, bessel):
  counts = np.stack([h[0] for h in history])
  means = np.stack([h[1] for h in history])
  # M2 in units of unit^2 (stats.in_units); float64 holds it in plain units
  m2s = np.stack([h[2] / h[3] ** 2 for h in history])
  if method == "mean_of_batches":
    variances = m2s / np.maximum(counts, 1)
    if bessel:
      variances = variances * counts / np.maximum(counts - 1, 1)
    return means.mean(0), variances.mean(0)
  total, mean, m2, _ = stats_lib.merge(counts, means, m2s, axis=0)
  denominator = np.maximum(total - 1, 1) if bessel else np.maximum(total, 1)
  return mean, m2 / denominator
