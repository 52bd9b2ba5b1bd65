"""Renorm, ghost batches, adjustment: jaxbn against tf_keras over several steps."""
import numpy as np
import pytest

from tests import keras_oracle

# data of ordinary range: the overflow guard stays off here (conftest.py)
ORDINARY_DATA = True


@pytest.mark.parametrize("clipping", [
    None, {}, {"rmax": 1.2}, {"rmin": 0.9}, {"dmax": 0.1},
    {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}])
@pytest.mark.parametrize("shape,axis", [((16, 4), -1), ((4, 3, 3, 5), -1),
                                        ((4, 5, 3, 3), 1),
                                        ((6, 4, 3), [1, 2])])
def test_renorm(clipping, shape, axis):
  kwargs = {"axis": axis, "renorm": True, "momentum": 0.8,
            "renorm_momentum": 0.7}
  if clipping is not None:
    kwargs["renorm_clipping"] = clipping
  keras_oracle.compare(kwargs, shape, steps=4)


@pytest.mark.parametrize("center,scale", [(True, False), (False, True)])
def test_renorm_without_center_or_scale(center, scale):
  keras_oracle.compare({"renorm": True, "center": center, "scale": scale,
                        "renorm_clipping": {"rmax": 1.3, "dmax": 0.5}},
                       (16, 3), steps=3)


@pytest.mark.parametrize("vbs", [1, 2, 4, 8])
@pytest.mark.parametrize("shape,axis", [((16, 4), -1), ((8, 3, 3, 5), -1),
                                        ((8, 5, 3, 3), 1),
                                        ((8, 4, 3), [1, 2]),
                                        ((8, 2, 3, 4), [2, 3])])
def test_virtual_batches(vbs, shape, axis):
  keras_oracle.compare({"axis": axis, "virtual_batch_size": vbs,
                        "momentum": 0.7}, shape, steps=3)


def test_virtual_batches_with_renorm():
  keras_oracle.compare({"virtual_batch_size": 4, "renorm": True,
                        "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}},
                       (16, 3, 5), steps=3)


def _adjust_channels(shape):
  channels = shape[-1]
  scale = np.linspace(0.5, 1.5, channels).astype(np.float32)
  bias = np.linspace(-0.2, 0.3, channels).astype(np.float32)
  return scale, bias


def _adjust_per_example(shape):
  rng = np.random.RandomState(int(np.prod(shape)))
  scale = rng.uniform(0.8, 1.2, (shape[0],) + (1,) * (len(shape) - 1))
  bias = rng.uniform(-0.1, 0.1, (shape[0],) + (1,) * (len(shape) - 1))
  return scale.astype(np.float32), bias.astype(np.float32)


@pytest.mark.parametrize("adjustment", [_adjust_channels, _adjust_per_example])
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True},
                                    {"center": False}, {"scale": False}])
def test_adjustment(adjustment, kwargs):
  keras_oracle.compare(kwargs, (8, 3, 5), steps=3, adjustment=adjustment)
