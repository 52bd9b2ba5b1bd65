"""Regularizers and constraints of every jaxbn layer in a Flax model.

``collect_layers`` traces the model once (abstractly, no computation) and
records each jaxbn layer's parameter path, config and input rank. With that:

* ``model_regularization_loss(layers, params)`` sums every layer's penalty
  (Keras' ``model.losses``);
* ``project(layers, params)`` applies every layer's constraints;
* ``constrain(layers)`` is an optax ``GradientTransformation`` to chain after
  the optimizer, so that ``optax.apply_updates`` lands on projected params
  (Keras applies constraints right after each optimizer step).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import optax
from flax.core import unfreeze

from jaxbn import penalties
from jaxbn.config import BatchNormConfig
from jaxbn.linen import BatchNormalization


class LayerInfo(NamedTuple):
  path: tuple  # module path inside the params tree
  config: BatchNormConfig
  input_shape: tuple

  @property
  def input_rank(self) -> int:
    return len(self.input_shape)


def collect_layers(model: nn.Module, variables: Mapping[str, Any], *args,
                   **kwargs) -> tuple[LayerInfo, ...]:
  """Finds every jaxbn layer that ``model.apply(variables, *args)`` calls."""
  found = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (isinstance(module, BatchNormalization)
        and context.method_name == "__call__"):
      x = call_args[0] if call_args else call_kwargs["x"]
      found[module.scope.path] = LayerInfo(tuple(module.scope.path),
                                           module.config, tuple(x.shape))
    return next_fun(*call_args, **call_kwargs)

  def run(v):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *args, **kwargs)

  jax.eval_shape(run, variables)
  return tuple(found.values())


def _subtree(params, path):
  node = penalties.unwrap_params(params)
  for name in path:
    node = node[name]
  return node


def model_regularization_loss(layers, params) -> jax.Array:
  """Sum of every layer's ``regularization_loss`` (Keras' ``model.losses``)."""
  total = 0.0
  for layer in layers:
    total = total + penalties.regularization_loss(layer.config,
                                                  _subtree(params, layer.path))
  return total


def project(layers, params):
  """``params`` with every jaxbn layer's constraints applied."""
  tree = unfreeze(penalties.unwrap_params(params))  # a fresh nested dict
  for layer in layers:
    parent = _subtree(tree, layer.path[:-1])
    parent[layer.path[-1]] = dict(penalties.apply_constraints(
        layer.config, parent[layer.path[-1]], input_rank=layer.input_rank))
  if "params" in params and isinstance(params["params"], Mapping):
    return {**params, "params": tree}
  return tree


def constrain(layers) -> optax.GradientTransformation:
  """An optax transform turning updates into ``project(p + u) - p``.

  Chain it last: ``optax.chain(optax.sgd(lr), jaxbn.constrain(layers))``; the
  update function needs ``params``.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("jaxbn.constrain needs params: call "
                       "tx.update(grads, opt_state, params).")
    new_params = project(layers, optax.apply_updates(params, updates))
    updates = jax.tree_util.tree_map(lambda n, p: n - p, new_params, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
