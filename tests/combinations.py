"""Which combinations of test factors run.

The default run covers every *pair* of factor values (each feature with each
layout, each feature with each mask, each layout with each mask): most
defects show in one factor or in the interaction of two. The long profile
(``HYPOTHESIS_PROFILE=long``, which also fuzzes longer) runs the full
product.
"""
import itertools
import os

EXHAUSTIVE = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def pairwise(first, second, third):
  """Cases ``(a, b, c)`` covering every pair of values of the three factors:
  the product of the first two, each with a third value cycling along both
  (which covers ``a`` with every ``c`` and ``b`` with every ``c`` while the
  first two factors each have at least as many values as the third)."""
  first, second, third = list(first), list(second), list(third)
  if EXHAUSTIVE:
    return list(itertools.product(first, second, third))
  if min(len(first), len(second)) < len(third):
    raise ValueError("pairwise: put the factor with fewest values last")
  return [(a, b, third[(i + j) % len(third)])
          for i, a in enumerate(first) for j, b in enumerate(second)]
