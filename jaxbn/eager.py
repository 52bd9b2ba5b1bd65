"""Eager calls as compiled programs, the least recently used dropped first.

An eager ``jaxbn.apply`` (no trace around it: called as it is, or under an
eager ``jax.grad``/``vjp``/``vmap``; Linen and NNX layers called eagerly too)
runs as one compiled program per configuration and argument shapes rather than
op by op: each of its few hundred operations would otherwise be compiled for
every new shape and dispatched on every call, and the overflow guard's
``lax.cond`` traced and compiled again on every call. Under ``jit`` (or any
trace: ``modes.outside_any_trace``) apply is traced inline, as any JAX
function. A program is keyed
on what its arithmetic reads: a config's initializers, regularizers and
constraints (callables a user may build anew on every call) are not part of
the key. At most ``MAX_PROGRAMS`` stay compiled (an input pipeline with many
batch shapes keeps memory bounded); :func:`clear` drops them all, and
``jax.clear_caches()`` frees their executables.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax

from jaxbn.config import BatchNormConfig

MAX_PROGRAMS = 64
_programs: collections.OrderedDict = collections.OrderedDict()


def call(fn: Callable, config: BatchNormConfig, resolved, *args):
  """``fn(config, resolved, *args)`` as a compiled program (``args``: pytrees
  of arrays, None allowed), called outside any trace
  (``modes.outside_any_trace``); op by op for a config that cannot be jit's
  static argument (a field a user made unhashable)."""
  try:
    config = arithmetic_config(config)
  except TypeError:
    return fn(config, resolved, *args)
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = (fn, config, resolved, tree,
         tuple((leaf.shape, leaf.dtype) for leaf in leaves))
  program = _programs.pop(key, None)
  if program is None:
    program = jax.jit(functools.partial(fn, config, resolved))
    while len(_programs) >= MAX_PROGRAMS:
      _programs.popitem(last=False)
  _programs[key] = program
  return program(*args)


def clear() -> None:
  """Drops every compiled eager program."""
  _programs.clear()


def size() -> int:
  """How many compiled eager programs are kept."""
  return len(_programs)


_DEFAULT = BatchNormConfig()
_NOT_READ_BY_APPLY = ("beta_initializer", "gamma_initializer",
                      "moving_mean_initializer", "moving_variance_initializer",
                      "beta_regularizer", "gamma_regularizer",
                      "beta_constraint", "gamma_constraint")


@functools.lru_cache(maxsize=256)
def arithmetic_config(config: BatchNormConfig) -> BatchNormConfig:
  """``config`` with the defaults for what ``apply`` never reads."""
  return dataclasses.replace(config, **{
      name: getattr(_DEFAULT, name) for name in _NOT_READ_BY_APPLY})
