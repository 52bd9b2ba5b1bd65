"""Sharding types of values as a trace sees them.

Over which manual mesh axes a value varies (shard_map), and whether jit's
(explicit) sharding of a value splits given axes.
"""
from __future__ import annotations

import jax
from jax import lax


def varying_axes(value) -> frozenset:
  """Manual mesh axes over which ``value`` differs (empty outside shard_map)."""
  aval = jax.typeof(value)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def like_inputs(outputs, *inputs):
  """``outputs`` typed as varying over every axis some input varies over.

  A custom call's results carry no such type; inside shard_map they must vary
  like the data they were computed from.
  """
  axes = frozenset().union(*(varying_axes(v) for v in inputs))
  if not axes:
    return outputs
  names = tuple(sorted(axes))
  return jax.tree.map(
      lambda out: lax.pcast(out, tuple(a for a in names
                                       if a not in varying_axes(out)),
                            to="varying"), outputs)


def sharded_along(value, axes) -> bool:
  """Whether ``value``'s sharding, as the trace sees it, splits one of ``axes``.

  Only explicit shardings are visible while tracing; automatic (GSPMD)
  shardings are decided after it.
  """
  spec = getattr(getattr(jax.typeof(value), "sharding", None), "spec", None)
  return spec is not None and any(
      i < len(spec) and spec[i] is not None for i in axes)
