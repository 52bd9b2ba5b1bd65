"""What a jaxbn trace decides and sees: its switches (which CPU kernels run,
which statistics), the platform it is lowered for, and the mesh axes its
values are sharded over.

The switches are JAX configuration states: read when a function is traced,
local to the thread (and context) that traces, and part of JAX's jit and
trace cache keys, so a function traced under one value is traced again under
another.
An already compiled object (``jax.jit(f).lower(...).compile()``) keeps the
program it was compiled with.

* ``cpu_kernels``: ``'auto'`` (default: the kernels where the process sees one
  device), ``'on'``, ``'off'``. Environment: ``JAXBN_CPU_KERNELS``; scoped:
  ``jaxbn.cpu_kernels.use(mode)``; global: ``jaxbn.cpu_kernels.set_mode``.
* ``statistics``: ``'auto'`` (default: two passes or the CPU kernels on CPU,
  one-read shifted sums on GPU/TPU, chosen when the program is lowered, so
  one traced program serves every platform), ``'accelerator'`` (the GPU/TPU
  algorithm on every platform, CPU included, and no kernel: what a TPU run
  computes, testable here) or ``'cpu'`` (the CPU algorithm, chosen when the
  program is traced: a program that only ever runs on CPU traces in less
  time, since the GPU/TPU algorithm is not traced beside it; lowered for
  GPU/TPU, it fails there). Environment: ``JAXBN_STATISTICS``; scoped:
  ``jaxbn.modes.statistics(mode)``. Every jaxbn site that depends on the
  platform asks :func:`platform_dependent`.
* ``overflow_guard``: ``'on'`` (default: a channel whose spread is beyond
  2^30 is measured in units of a power of two; on CPU its statistics are
  taken again in a ``lax.cond`` that ordinary batches skip, on GPU/TPU the
  units come from the one read with no conditional; see ``stats.in_units``) or
  ``'off'`` (no retake and no ``cond``: the program of ordinary data, which
  the benchmark's byte counts measure; a spread beyond about 1e18 then
  overflows). Environment: ``JAXBN_OVERFLOW_GUARD``; scoped:
  ``jaxbn.modes.overflow_guard(mode)``. Under ``vmap`` its conds stay
  conds (``stats.guard_cond``): the retake runs for every member when any
  member needs it.

The mesh, as the trace sees it (:func:`varying_axes`, :func:`like_inputs`,
:func:`sharded_along`, :func:`automatic_mesh_axes`), decides where
statistics may be taken locally, where a parameter's gradient is summed,
and where a conditional would cost a collective. Whether there is a trace
at all (:func:`outside_any_trace`) decides whether a call runs as a cached
compiled program (``jaxbn.eager``).
"""
from __future__ import annotations

import numbers
import os

import jax
import numpy as np
from jax import lax
from jax._src import config as _config
from jax.interpreters import ad

KERNEL_MODES = ("auto", "on", "off")
STATISTICS_MODES = ("auto", "accelerator", "cpu")
GUARD_MODES = ("on", "off")


def _state(name, values, help_text):
  # The default comes from the environment variable NAME.upper(), else the
  # first value.
  value = os.environ.get(name.upper(), values[0])
  if value not in values:
    raise ValueError(f"{name.upper()} must be one of {values}; got {value!r}.")
  return _config.enum_state(name, values, values[0], help_text,
                            include_in_jit_key=True,
                            include_in_trace_context=True)


cpu_kernels = _state("jaxbn_cpu_kernels", KERNEL_MODES,
                     "jaxbn: when its CPU kernels run (auto, on, off).")
statistics = _state("jaxbn_statistics", STATISTICS_MODES,
                    "jaxbn: the batch-statistics algorithm (auto, or the "
                    "GPU/TPU one on every platform: accelerator, or "
                    "the CPU one fixed at trace time: cpu).")
overflow_guard = _state("jaxbn_overflow_guard", GUARD_MODES,
                        "jaxbn: retake the statistics of a channel spread "
                        "beyond 2^30 in units of a power of two (on, off).")


def platform_dependent(cpu, default):
  """``cpu()`` on CPU, ``default()`` on GPU/TPU: decided when the program is
  lowered (``lax.platform_dependent``, which traces both) under the
  statistics mode ``'auto'``; at trace time under ``'accelerator'``
  (``default``) and ``'cpu'`` (``cpu``). The one place jaxbn asks which
  platform runs it."""
  mode = statistics.value
  if mode == "accelerator":
    return default()
  if mode == "cpu":
    return cpu()
  return lax.platform_dependent(cpu=cpu, default=default)


def for_compiler(cpu, default):
  """``cpu()`` where XLA:CPU compiles the program, ``default()`` where
  XLA:GPU/TPU do: one computation written for each compiler's fusion rules
  (the same numbers; see ``stats.sibling_sums``). Decided when the program
  is lowered, under every statistics mode but ``'cpu'`` (at trace time):
  the GPU/TPU algorithm compiled for CPU (``'accelerator'``, or a mesh
  with an automatic axis) is laid out for XLA:CPU too."""
  if statistics.value == "cpu":
    return cpu()
  return lax.platform_dependent(cpu=cpu, default=default)


# ------------------------------------------------ the mesh, as the trace sees it
#
# Over which manual mesh axes a value varies (shard_map), whether jit's
# (explicit) sharding of a value splits given axes, and whether the trace's
# mesh has axes XLA shards automatically.


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


def automatic_mesh_axes() -> bool:
  """Whether the mesh of the current trace has an axis of size > 1 that XLA
  shards automatically (not a ``shard_map`` manual axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and any(
      size > 1 and kind != jax.sharding.AxisType.Manual
      for size, kind in zip(mesh.axis_sizes, mesh.axis_types))


# ------------------------------------------------ whether anything traces
#
# An eager transformation (autodiff, vmap) wraps concrete values in tracers
# without building a program; jit, scan, remat and the rest trace one.

_CONCRETE = (jax.Array, np.ndarray, np.generic, numbers.Number)


def _carried(leaf) -> list:
  """``leaf`` and what it carries, outermost first: a tracer of an eager
  transformation (autodiff, vmap) carries the value beneath it (``primal``,
  ``val``), down to a concrete array; a trace's own tracer (under ``jit``,
  ``scan``, ...) carries no array (the list ends with its variable)."""
  chain = [leaf]
  while isinstance(leaf, jax.core.Tracer):
    leaf = getattr(leaf, "primal", getattr(leaf, "val", None))
    chain.append(leaf)
  return chain


def _tangent_in(chain: list) -> bool:
  return any(isinstance(t, ad.JVPTracer) for t in chain)


def carries_tangents(*trees) -> bool:
  """Whether a forward-mode (JVP) tracer is among the leaves, under any
  vmap, shard_map or linearize tracers around it. Reverse mode (``grad``,
  ``vjp``) linearizes without one."""
  return any(_tangent_in(_carried(leaf))
             for leaf in jax.tree_util.tree_leaves(trees))


def outside_any_trace(*trees) -> bool:
  """Whether every leaf is concrete or carried by eager reverse-mode
  autodiff (``grad``, ``vjp``) or ``vmap`` tracers over a concrete value:
  no program is being traced, so a call may run as one of its own. Not
  under forward-mode tangents (``jvp``, ``jacfwd``): ``closed_form.train``
  must see them to take its autodiff reference."""
  chains = (_carried(leaf) for leaf in jax.tree_util.tree_leaves(trees))
  return all(isinstance(chain[-1], _CONCRETE) and not _tangent_in(chain)
             for chain in chains)
