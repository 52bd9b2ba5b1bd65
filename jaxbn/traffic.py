"""Memory traffic of a compiled program, read from XLA and jaxbn's kernels.

What the benchmark reports as "bytes" and what the tests bound: XLA's
``cost_analysis`` bytes accessed, plus the operands and results of jaxbn's CPU
kernels (a custom call counts as moving nothing to XLA).
"""
from __future__ import annotations

import math
import re

from jaxbn import modes

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
                "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) [\w\-]+\(")


def _shape_bytes(text):
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    size = _DTYPE_BYTES.get(dtype)
    if size is not None:
      total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


# Reads of its operands per call: the one-call backward passes over dy and x
# twice (the gradient sums, then the input gradient).
_KERNEL_READS = {"jaxbn_backward": 2}


def bytes_moved(compiled) -> float:
  """XLA's bytes accessed plus what jaxbn's CPU kernels read and write.

  ``cost_analysis`` counts a custom call as moving nothing; each jaxbn kernel
  reads its operands once (``jaxbn_backward`` twice) and writes its results
  once.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total = float(cost.get("bytes accessed", 0.0))
  text = compiled.as_text()
  shapes = {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      shapes[match.group(1)] = match.group(2)
  for line in text.splitlines():
    target = re.search(r'custom_call_target="(jaxbn_\w+)"', line)
    if target is None:
      continue
    match = _INSTRUCTION.match(line)
    operands = line[line.index("custom-call(") + len("custom-call("):]
    operands = operands[:operands.index(")")]
    names = [o.strip().lstrip("%") for o in operands.split(",") if o.strip()]
    reads = _KERNEL_READS.get(target.group(1), 1)
    total += _shape_bytes(match.group(2)) + reads * sum(
        _shape_bytes(shapes.get(n, "")) for n in names)
  return total


def ordinary_path_bytes(jitted, *args) -> float:
  """:func:`bytes_moved` by the program ordinary data run: ``jitted``
  compiled with jaxbn's overflow guard off (``jaxbn.modes``). XLA's cost
  analysis charges a ``lax.cond``'s branches as if they ran, and the guard's
  retake runs only for a channel spread beyond 2^30."""
  with modes.overflow_guard("off"):
    return bytes_moved(jitted.lower(*args).compile())
