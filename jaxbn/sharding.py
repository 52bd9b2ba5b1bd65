"""Batch statistics under sharded ``jit``: global by default, local on request.

Under ``jax.jit`` with the batch sharded over a mesh, ``jaxbn.apply`` needs no
``axis_name``: its reductions are global array reductions, so XLA computes the
statistics of the whole (global) batch and inserts the collectives itself.

``apply_local`` asks for the opposite: each device normalizes its shard with
its own statistics (as with ``pmap`` and no ``axis_name``), while the state
stays replicated: every device's updated state is averaged over the mesh axis
(for the plain moving averages this equals one EMA step toward the mean of the
per-device statistics).
"""
from __future__ import annotations

import jax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxbn import core
from jaxbn.config import BatchNormConfig


def apply_local(config: BatchNormConfig, params, state, x, *, mesh: Mesh,
                batch_axis: str = "data", training: bool, mask=None, key=None):
  """``jaxbn.apply`` with per-device statistics over ``mesh[batch_axis]``.

  ``x`` (and ``mask``) are split along their first axis over ``batch_axis``;
  params and state are replicated. Returns ``(y, new_state)`` like ``apply``.
  """
  data = P(batch_axis)

  def local(params, state, x, mask):
    y, new_state = core.apply(config, params, state, x, training=training,
                              mask=mask, key=key)
    if training and config.trainable:
      new_state = jax.tree_util.tree_map(
          lambda v: lax.pmean(v, batch_axis) if v.dtype.kind == "f" else
          lax.pmax(v, batch_axis), new_state)
    return y, new_state

  mask_spec = None if mask is None else data
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P(), P(), data, mask_spec),
                       out_specs=(data, P()))(params, state, x, mask)
