"""What GPU/TPU run: the training step lowered for ``cuda``, ``rocm`` and
``tpu`` here (``jax.export`` lowers for any platform on a CPU), read as
StableHLO.

* **No conditional that branches on data** on cuda/rocm: XLA:GPU runs a
  conditional by copying its predicate to the host and draining the stream.
  The only ``stablehlo.case`` ops left are ``lax.platform_dependent``'s,
  whose index is a constant of the lowering (XLA removes them before it
  runs anything); every case whose index depends on an argument is a
  branch, and there is none, in every configuration.
* **One read of x for the statistics**: the forward's reductions over x are
  siblings (none depends on another), and so are the backward's two sums.
* **No jaxbn custom call**, and no more x-sized operands read per pass than
  flax.linen.BatchNorm's program.
"""
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir, passmanager
from jax.sharding import Mesh, PartitionSpec as P

import jaxbn
from jaxbn import cpu_kernels

# lowers for GPU/TPU: programs keep every platform's algorithm (conftest)
LOWERS_FOR_ACCELERATORS = True

SHAPE = (8, 4, 4, 16)

CONFIGS = {
    "plain": {},
    "renorm with clipping": dict(renorm=True, renorm_clipping=dict(
        rmin=0.5, rmax=2.0, dmax=1.0)),
    "ghost batches": dict(virtual_batch_size=4),
    "axis list": dict(axis=[2, 3]),
    "relu": dict(activation="relu"),
    "fused=False": dict(fused=False),
    "adjustment": dict(adjustment=lambda shape: (jnp.full((16,), 1.5),
                                                 jnp.full((16,), 0.5))),
    "mask": {},
    "sequence mask": {},
    "axis_name (shard_map)": {},
    "axis_name (pmap)": {},
}


def _step(config_args, *, mask=False, axis_name=None):
  """``(params, x, dy) -> (y, state, param grads, dx)``: a training step."""
  config = jaxbn.BatchNormConfig(**config_args)
  params, state = jaxbn.init(config, SHAPE)
  # a row mask, or one per position (Keras' sequence mask: every reduced
  # axis), which XLA:CPU sums as a product with a retake in a cond
  m = {False: None, "rows": jnp.arange(SHAPE[0]) % 3 != 0,
       "positions": (jnp.arange(math.prod(SHAPE[:-1])) % 3 != 0).reshape(
           SHAPE[:-1])}[mask]

  def step(params, x, dy):
    def f(p, x):
      return jaxbn.apply(config, p, state, x, training=True, mask=m,
                         axis_name=axis_name)
    (y, new_state), vjp = jax.vjp(f, params, x)
    return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))

  return step, params


def _lowered(name, platform, dtype=jnp.float32):
  x = jnp.ones(SHAPE, dtype)
  if name == "axis_name (shard_map)":
    step, params = _step({}, axis_name="data")
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"),
                                                          P("data")),
                               out_specs=(P("data"), P(), P()),
                               check_vma=False))
  elif name == "axis_name (pmap)":
    step, params = _step({}, axis_name="data")
    fn = jax.jit(jax.pmap(step, axis_name="data", in_axes=(None, 0, 0)))
    x = jnp.ones((2,) + SHAPE, dtype)
  else:
    config_args = CONFIGS[name]
    step, params = _step(config_args, mask={
        "mask": "rows", "sequence mask": "positions"}.get(name, False))
    fn = jax.jit(step)
  with cpu_kernels.use("on"):  # what the kernels' door hands to GPU/TPU
    exported = jax.export.export(fn, platforms=(platform,))(params, x, x)
  return exported.mlir_module()


def _operations(text):
  context = mlir.make_ir_context()
  module = ir.Module.parse(text, context=context)
  with context:  # one function: calls inlined (jit-ted helpers are calls)
    passmanager.PassManager.parse("builtin.module(inline)").run(
        module.operation)

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          yield inner
          yield from walk(inner)

  return module, context, list(walk(module.operation))


def _inputs(value):
  """The values ``value`` is computed from: its op's operands; for a
  ``stablehlo.case``'s result, what each branch returns in its place (the
  branches read outer values directly)."""
  owner = value.owner
  if owner.name == "stablehlo.case":
    index = ir.OpResult(value).result_number
    return [region.blocks[0].operations[
        len(region.blocks[0].operations) - 1].operands[index]
            for region in owner.regions] + [owner.operands[0]]
  return list(owner.operands)


def _depends_on_arguments(value, seen=None):
  """Whether ``value`` is computed from a block argument (data), rather than
  from constants alone."""
  seen = set() if seen is None else seen
  owner = value.owner
  if isinstance(owner, ir.Block):
    return True
  if value in seen:
    return False
  seen.add(value)
  return any(_depends_on_arguments(v, seen) for v in _inputs(value))


def branching_conditionals(text):
  """The ``stablehlo.case``/``if`` ops with two or more branches whose
  index or predicate depends on data."""
  module, context, ops = _operations(text)
  with context:
    return [op.name for op in ops
            if op.name in ("stablehlo.case", "stablehlo.if")
            and len(op.regions) >= 2
            and _depends_on_arguments(op.operands[0])]


def _size(value):
  shape = ir.ShapedType(value.type)
  return int(np.prod(shape.shape)) if shape.has_static_shape else 0


class Reduction(NamedTuple):
  level: int         # passes over the data up to and including this one
  reads: frozenset   # the data arguments it reads (through data-sized values)
  upstream: frozenset  # the data reductions it depends on


def _reductions(text, size):
  """The reductions over operands of ``size`` elements (the data), each
  with its level, the data arguments it reads (reached through
  ``size``-element values only: what one fused read takes in) and the data
  reductions upstream of it. Two reductions that read the same data and
  neither of which is upstream of the other are siblings: XLA:GPU/TPU fuse
  them into one read (multi-output fusion)."""
  module, context, ops = _operations(text)
  with context:
    # reductions by the SSA name of their first result (MLIR's Python
    # objects make poor dictionary keys)
    state = ir.AsmState(module.operation)
    name = lambda op: op.results[0].get_name(state)
    found = {name(op): op for op in ops if op.name == "stablehlo.reduce"
             and _size(op.operands[0]) == size}

    def upstream(op):
      result, stack, seen = set(), list(op.operands), set()
      while stack:
        value = stack.pop()
        owner = value.owner
        if isinstance(owner, ir.Block) or value in seen:
          continue
        seen.add(value)
        if owner.name == "stablehlo.reduce" and _size(
            owner.operands[0]) == size and name(owner) != name(op):
          result.add(name(owner))
        stack.extend(_inputs(value))
      return frozenset(result)

    def reads(op):
      result, stack, seen = set(), [v for v in op.operands
                                    if _size(v) == size], set()
      while stack:
        value = stack.pop()
        if isinstance(value.owner, ir.Block):
          result.add(ir.BlockArgument(value).arg_number)
          continue
        if value in seen:
          continue
        seen.add(value)
        stack.extend(v for v in _inputs(value) if _size(v) == size)
      return frozenset(result)

    ups = {key: upstream(op) for key, op in found.items()}
    data = {key: reads(op) for key, op in found.items()}

    @functools.lru_cache(maxsize=None)
    def level(key):
      # a pass over the data is a level; a reduction that reads none of it
      # (a mask's search, of x's size at a small shape) adds none
      below = max((level(k) for k in ups[key]), default=0)
      return below + 1 if data[key] else below

    return {key: Reduction(level(key), data[key], ups[key])
            for key in found}


def _siblings(reductions, keys):
  return all(a not in reductions[b].upstream for a in keys for b in keys)


def _reads_per_level(reductions):
  levels = {}
  for r in reductions.values():
    if r.reads:
      levels[r.level] = levels.get(r.level, frozenset()) | r.reads
  return levels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_conditional_branches_on_data_on_gpu(name):
  assert branching_conditionals(_lowered(name, "cuda")) == [], name


@pytest.mark.parametrize("name", ["plain", "mask", "axis_name (shard_map)"])
def test_nor_on_rocm(name):
  assert branching_conditionals(_lowered(name, "rocm")) == [], name


@pytest.mark.parametrize("name", ["plain", "relu", "mask", "ghost batches",
                                  "fused=False"])
def test_on_cpu_the_guard_branches_once_for_the_statistics(name):
  # the same walk finds the overflow guard's cond in the CPU program: the
  # statistics' retake, per-channel results only; the backward runs in
  # units with no cond of its own (the CPU kernel takes the units too).
  # fused=False differentiates the retake's cond by autodiff: its
  # transpose is a second cond.
  expected = 2 if name == "fused=False" else 1
  assert len(branching_conditionals(_lowered(name, "cpu"))) == expected


@pytest.mark.parametrize("name,platform,dtype", [
    ("plain", "cuda", jnp.float32), ("plain", "cuda", jnp.bfloat16),
    ("relu", "cuda", jnp.bfloat16), ("mask", "cuda", jnp.float32),
    ("plain", "tpu", jnp.float32), ("mask", "tpu", jnp.bfloat16),
    ("sequence mask", "cuda", jnp.float32)])
def test_one_read_per_pass_and_no_more_reads_than_flax(name, platform, dtype):
  text = _lowered(name, platform, dtype)
  assert not [line for line in text.splitlines()
              if "custom_call" in line and "jaxbn" in line]
  size = int(np.prod(SHAPE))
  ours = _reductions(text, size)
  x, dy = 2, 3  # the arguments after gamma and beta
  # the forward's statistics: the five scaled sums (stats.ScaledSums),
  # siblings reading x alone
  statistics = [k for k, r in ours.items() if r.reads == {x}]
  assert len(statistics) == 5 and _siblings(ours, statistics), ours
  # the backward's sums: S1 and S2, siblings reading dy (and x)
  sums = [k for k, r in ours.items() if dy in r.reads]
  assert len(sums) == 2 and _siblings(ours, sums), ours
  assert all(ours[k].reads <= {x, dy} for k in sums)
  # and nothing else reads them (at this shape, the sequence mask's search
  # of its 128 positions for 16 samples is a reduction of x's size too, of
  # the mask alone)
  assert len([k for k, r in ours.items() if r.reads]) == 7, ours
  # no more sequential passes than flax's, no more data read in each
  theirs = _reads_per_level(_reductions(_flax_program(platform, dtype), size))
  mine = _reads_per_level(ours)
  assert len(mine) <= len(theirs), (mine, theirs)
  for level, read in mine.items():
    assert len(read) <= len(theirs[level]), (mine, theirs)


def _flax_program(platform, dtype):
  bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3,
                    dtype=dtype)
  x = jnp.ones(SHAPE, dtype)
  variables = bn.init(jax.random.PRNGKey(0), x)

  def step(params, x, dy):
    def f(p, x):
      return bn.apply({"params": p, "batch_stats": variables["batch_stats"]},
                      x, mutable=["batch_stats"])
    (y, new_state), vjp = jax.vjp(f, params, x)
    return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))

  return jax.export.export(jax.jit(step), platforms=(platform,))(
      variables["params"], x, x).mlir_module()
