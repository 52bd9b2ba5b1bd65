"""jaxbn against the real tf_keras BatchNormalization (the standard layer)."""
import itertools

import numpy as np
import pytest

from tests import keras_oracle

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True

# (input shape, axis): ranks 2-5; int, negative and list axes.
SHAPES_AXES = [
    ((16, 5), -1),
    ((16, 5), 1),
    ((8, 6, 4), -1),
    ((8, 6, 4), 1),
    ((8, 6, 4), [1, 2]),
    ((6, 5, 4, 3), -1),
    ((6, 5, 4, 3), 3),
    ((6, 5, 4, 3), 1),
    ((6, 5, 4, 3), -3),
    ((6, 5, 4, 3), 2),
    ((6, 5, 4, 3), [1, 3]),
    ((6, 5, 4, 3), [-1, -2]),
    ((4, 3, 4, 5, 2), -1),
    ((4, 3, 4, 5, 2), 4),
    ((4, 3, 4, 5, 2), 1),
    ((4, 3, 4, 5, 2), 2),
    ((4, 3, 4, 5, 2), [1, 4]),
]


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("fused", [None, False])
def test_axes_and_ranks(shape, axis, fused):
  kwargs = {"axis": axis, "momentum": 0.9}
  if fused is not None:
    kwargs["fused"] = fused
  keras_oracle.compare(kwargs, shape)


@pytest.mark.parametrize(
    "center,scale,momentum,epsilon",
    [(c, s, m, e) for (c, s), m, e in itertools.product(
        [(True, True), (False, True), (True, False), (False, False)],
        [0.0, 0.5, 0.99], [1e-3, 1e-5])][::2])
@pytest.mark.parametrize("shape,axis", [((12, 4), -1), ((4, 3, 3, 5), -1),
                                        ((4, 5, 3, 3), 1)])
def test_center_scale_momentum_epsilon(center, scale, momentum, epsilon,
                                       shape, axis):
  keras_oracle.compare({"axis": axis, "center": center, "scale": scale,
                        "momentum": momentum, "epsilon": epsilon}, shape)


def test_fused_true_matches_keras_fused_kernel():
  keras_oracle.compare({"fused": True, "momentum": 0.5}, (6, 4, 4, 3))
  keras_oracle.compare({"fused": True, "axis": 1}, (6, 3, 4, 4))
  keras_oracle.compare({"fused": True, "axis": 4}, (2, 3, 3, 3, 5))


def test_trainable_false_means_inference():
  keras_oracle.compare({"trainable": False}, (8, 3, 3, 4))
  keras_oracle.compare({"trainable": False, "fused": False}, (16, 6))


def test_large_mean_data():
  keras_oracle.compare({"momentum": 0.9}, (32, 4), data_mean=1e3,
                       data_std=1.0)


def test_masked_statistics_match_keras_weighted_moments():
  rng = np.random.RandomState(3)
  mask = rng.rand(8, 6) > 0.3
  keras_oracle.compare({"fused": False}, (8, 6, 4), mask=mask)
