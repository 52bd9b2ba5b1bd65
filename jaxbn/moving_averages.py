"""Exponential moving averages as Keras updates them.

``ema(average, value, momentum) = average - (average - value) * (1 - momentum)``

This is ``momentum * average + (1 - momentum) * value`` written the way Keras
writes it (``assign_sub``), which keeps float32 results equal to Keras'.
``momentum`` is Keras' convention: the weight of the old average (PyTorch's
``momentum`` is ``1 - momentum``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ema(average: jax.Array, value: jax.Array, momentum: float,
        valid: jax.Array | None = None) -> jax.Array:
  """One moving-average step; where ``valid`` is False the average is kept."""
  value = jnp.asarray(value, average.dtype).reshape(average.shape)
  decay = jnp.asarray(1.0 - momentum, average.dtype)
  updated = average - (average - value) * decay
  if valid is None:
    return updated
  return jnp.where(jnp.reshape(valid, jnp.shape(valid)), updated, average)
