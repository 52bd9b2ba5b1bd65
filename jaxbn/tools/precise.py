"""Population statistics (Precise BN): exact moving statistics after training.

The moving averages of a trained network lag behind its final weights. With
the weights frozen, ``precise_statistics`` runs N batches through the model in
training mode, records every jaxbn layer's batch statistics and replaces the
moving statistics with

* ``method='mean_of_batches'``: the plain average over batches of the
  per-batch means and variances (fvcore's PreciseBN), or
* ``method='all_samples'``: the mean and variance of all samples pooled
  (Chan's merge of the per-batch ``(count, mean, M2)``),

the variance following each layer's ``moving_variance_estimator``.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax.linen as nn
from flax.core import unfreeze
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxbn import stats as stats_lib
from jaxbn.linen import BatchNormalization
from jaxbn.model_penalties import collect_layers

_COLLECTION = "jaxbn_batch_moments"


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if isinstance(module, BatchNormalization) and \
      context.method_name == "__call__":
    x = args[0] if args else kwargs["x"]
    mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
    config = module.config
    resolved = config.resolve(x.shape)
    sd = stats_lib.stat_dtype(x.dtype)
    weights = None if mask is None else jnp.broadcast_to(
        jnp.asarray(mask, sd), x.shape)
    count, mean, m2, inv_unit = stats_lib.in_units(stats_lib.local_moments)(
        x.astype(sd), resolved.reduction_axes, weights)
    if inv_unit is None:  # the overflow guard is off: no units
      inv_unit = jnp.ones_like(mean)
    module.sow(_COLLECTION, "moments", jax.tree_util.tree_map(
        lambda v: v.reshape(resolved.param_shape),
        (count, mean, m2, inv_unit)))
  return next_fun(*args, **kwargs)


def precise_statistics(model: nn.Module, variables: Mapping[str, Any],
                       batches: Iterable, *, method: str = "all_samples",
                       num_batches: int | None = None, progress: bool = True,
                       **apply_kwargs) -> dict:
  """Returns ``variables`` with exact moving statistics for every jaxbn layer.

  Args:
    model: a Linen model containing ``jaxbn.BatchNormalization`` layers.
    variables: its variables (``params`` and ``batch_stats``); unchanged.
    batches: model inputs (an array, or a tuple of positional arguments).
    method: ``'all_samples'`` or ``'mean_of_batches'``.
    num_batches: stop after this many batches.
    progress: show a progress bar.
    **apply_kwargs: passed to ``model.apply`` (e.g. ``training=True``).
  """
  if method not in ("all_samples", "mean_of_batches"):
    raise ValueError(f"`method` must be 'all_samples' or 'mean_of_batches'; "
                     f"got {method!r}.")

  @jax.jit
  def moments_of(variables, args):
    with nn.intercept_methods(_interceptor):
      _, sown = model.apply(variables, *args, mutable=["batch_stats",
                                                       _COLLECTION],
                            **apply_kwargs)
    return sown[_COLLECTION]

  totals = None
  seen = 0
  for batch in tqdm(batches, total=num_batches, desc="precise BN",
                    disable=not progress):
    if num_batches is not None and seen >= num_batches:
      break
    args = batch if isinstance(batch, tuple) else (batch,)
    sown = jax.tree_util.tree_map(np.asarray, moments_of(variables, args))
    per_layer = _flatten_sown(sown)
    if totals is None:
      totals = {path: [] for path in per_layer}
    for path, moments in per_layer.items():
      totals[path].append(moments)
    seen += 1
  if not totals:
    raise ValueError("precise_statistics needs at least one batch.")
  new_stats = unfreeze(jax.tree_util.tree_map(np.asarray,
                                              variables["batch_stats"]))
  layers = {layer.path: layer for layer in collect_layers(
      model, variables, *args, mutable=["batch_stats"], **apply_kwargs)}
  for path, history in totals.items():
    config = layers[path].config
    resolved = config.resolve(layers[path].input_shape)
    mean, var = _combine(
        history, method,
        bessel=config.bessel_corrected_moving_variance(resolved))
    node = new_stats
    for name in path:
      node = node[name]
    node["moving_mean"] = mean.astype(np.float32)
    # a variance beyond float32's range saturates, as in training
    node["moving_variance"] = np.minimum(
        var, np.finfo(np.float32).max).astype(np.float32)
    if "moving_stddev" in node:
      node["moving_stddev"] = np.sqrt(var + config.epsilon).astype(np.float32)
  return {**variables, "batch_stats": new_stats}


def _combine(history, method, bessel):
  counts = np.stack([h[0] for h in history]).astype(np.float64)
  means = np.stack([h[1] for h in history]).astype(np.float64)
  # M2 in units of unit^2 (stats.in_units); float64 holds it in plain units
  m2s = np.stack([h[2] / h[3].astype(np.float64) ** 2 for h in history])
  if method == "mean_of_batches":
    variances = m2s / np.maximum(counts, 1)
    if bessel:
      variances = variances * counts / np.maximum(counts - 1, 1)
    return means.mean(0), variances.mean(0)
  total, mean, m2, _ = stats_lib.merge(counts, means, m2s, axis=0)
  denominator = np.maximum(total - 1, 1) if bessel else np.maximum(total, 1)
  return mean, m2 / denominator


def _flatten_sown(tree, prefix=()):
  out = {}
  for name, value in tree.items():
    if name == "moments":
      out[prefix] = value[0]  # sow keeps a tuple of calls; one call each
    else:
      out.update(_flatten_sown(value, prefix + (name,)))
  return out
