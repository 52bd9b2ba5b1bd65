"""Seeded random configurations of every Keras argument against tf_keras."""
import numpy as np
import pytest

from tests import keras_oracle

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

N_CONFIGS = 60


def _adjustment(shape):
  channels = shape[-1]
  return (np.linspace(0.7, 1.3, channels).astype(np.float32),
          np.linspace(-0.1, 0.2, channels).astype(np.float32))


def random_case(seed):
  rng = np.random.RandomState(seed)
  rank = int(rng.choice([2, 3, 4, 5]))
  batch = int(rng.choice([4, 8, 12]))
  shape = (batch,) + tuple(int(rng.randint(2, 5)) for _ in range(rank - 1))
  if rank > 2 and rank < 5 and rng.rand() < 0.25:
    axis = sorted(int(a) for a in rng.choice(np.arange(1, rank), 2,
                                             replace=False))
  else:
    axis = int(rng.choice(np.arange(1, rank)))
    if rng.rand() < 0.5:
      axis -= rank
  kwargs = {
      "axis": axis,
      "momentum": float(rng.choice([0.0, 0.5, 0.9, 0.99])),
      "epsilon": float(rng.choice([1e-3, 1e-5, 0.1])),
      "center": bool(rng.rand() < 0.8),
      "scale": bool(rng.rand() < 0.8),
  }
  adjustment = None
  special = rng.choice(["none", "renorm", "vbs", "adjust", "renorm_vbs"])
  if special in ("renorm", "renorm_vbs"):
    kwargs["renorm"] = True
    kwargs["renorm_momentum"] = float(rng.choice([0.5, 0.9, 0.99]))
    clip = {}
    for key, values in (("rmax", [1.1, 1.5, 3.0]), ("rmin", [0.3, 0.9]),
                        ("dmax", [0.05, 0.5, 5.0])):
      if rng.rand() < 0.6:
        clip[key] = float(rng.choice(values))
    if clip or rng.rand() < 0.5:
      kwargs["renorm_clipping"] = clip
  if special in ("vbs", "renorm_vbs"):
    kwargs["virtual_batch_size"] = int(rng.choice(
        [d for d in (1, 2, 4) if batch % d == 0]))
    # Keep >= 4 elements per channel in each virtual batch: with fewer, the
    # input gradient is a difference of nearly equal float32 terms and both
    # libraries carry rounding error far above 2e-4 of its size.
    axes = [kwargs["axis"]] if isinstance(kwargs["axis"], int) else axis
    per_row = int(np.prod([shape[i] for i in range(1, rank)
                           if i not in [a % rank for a in axes]]))
    if kwargs["virtual_batch_size"] * per_row < 4:
      kwargs["virtual_batch_size"] = min(
          d for d in range(1, batch + 1)
          if batch % d == 0 and (d * per_row >= 4 or d == batch))
  if special == "adjust":
    adjustment = _adjustment
    if isinstance(axis, int) and axis % rank != rank - 1:
      kwargs["axis"] = -1
  fused_ok = (special == "none" and isinstance(kwargs["axis"], int)
              and rank in (4, 5)
              and kwargs["axis"] % rank in (1, rank - 1))
  fused_choices = [None, False] + ([True] if fused_ok else [])
  fused = fused_choices[rng.randint(len(fused_choices))]
  if fused is not None:
    kwargs["fused"] = fused
  if rng.rand() < 0.1:
    kwargs["trainable"] = False
  return shape, kwargs, adjustment


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_random_configuration_matches_keras(seed):
  shape, kwargs, adjustment = random_case(seed)
  keras_oracle.compare(kwargs, shape, steps=3, seed=seed,
                       adjustment=adjustment)
