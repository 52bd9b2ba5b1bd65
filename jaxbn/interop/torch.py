"""PyTorch ``BatchNorm1d/2d/3d`` <-> jaxbn.

PyTorch's conventions differ from Keras' in three ways that break ported
models: its ``momentum`` is the weight of the *new* value (Keras' is
``1 - momentum``), its default ``eps`` is 1e-5 (Keras: 1e-3), and its running
variance is Bessel-corrected (unbiased). ``from_torch`` converts the first,
keeps the second, and selects ``moving_variance_estimator='unbiased'``.
"""
from __future__ import annotations

import numpy as np

from jaxbn.linen import BatchNormalization


def from_torch(bn) -> tuple[BatchNormalization, dict]:
  """``(module, variables)`` equal to a ``torch.nn.BatchNorm{1,2,3}d``.

  The channel axis is 1 (PyTorch's NC... layout). ``momentum=None``
  (PyTorch's cumulative average) and ``track_running_stats=False`` have no
  Keras equivalent and raise.
  """
  import torch
  if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
    raise TypeError(f"from_torch expects torch.nn.BatchNorm1d/2d/3d; got "
                    f"{type(bn).__name__}.")
  if bn.momentum is None:
    raise ValueError(
        "torch BatchNorm with momentum=None keeps a cumulative average, which "
        "Keras' moving average cannot express; set bn.momentum (e.g. 0.1) or "
        "recompute population statistics with jaxbn.tools.precise_statistics.")
  if not bn.track_running_stats or bn.running_mean is None:
    raise ValueError(
        "torch BatchNorm with track_running_stats=False has no running "
        "statistics to port; it always normalizes with batch statistics.")
  module = BatchNormalization(
      axis=1, momentum=1.0 - float(bn.momentum), epsilon=float(bn.eps),
      center=bool(bn.affine), scale=bool(bn.affine),
      moving_variance_estimator="unbiased")
  # copy: torch updates its buffers in place, numpy() would share them
  to_np = lambda t: np.array(t.detach().cpu().float().numpy())
  params = {}
  if bn.affine:
    params = {"gamma": to_np(bn.weight), "beta": to_np(bn.bias)}
  stats = {"moving_mean": to_np(bn.running_mean),
           "moving_variance": to_np(bn.running_var)}
  return module, {"params": params, "batch_stats": stats}


def to_torch(module: BatchNormalization, variables, dims: int = 2):
  """A ``torch.nn.BatchNorm{dims}d`` with the module's numbers (axis 1)."""
  import torch
  config = module.config
  axis = config.axis if isinstance(config.axis, int) else None
  if axis != 1 or config.renorm or config.virtual_batch_size is not None:
    raise ValueError(
        "Only axis=1 layers without renorm or virtual batches map onto "
        f"torch BatchNorm; got axis={config.axis!r}, renorm={config.renorm}, "
        f"virtual_batch_size={config.virtual_batch_size}.")
  if config.center != config.scale:
    raise ValueError("torch BatchNorm has gamma and beta together (affine); "
                     f"got center={config.center}, scale={config.scale}.")
  cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
         3: torch.nn.BatchNorm3d}[dims]
  stats = variables["batch_stats"]
  channels = int(np.asarray(stats["moving_mean"]).size)
  bn = cls(channels, eps=config.epsilon, momentum=1.0 - config.momentum,
           affine=config.scale)
  with torch.no_grad():
    if config.scale:
      bn.weight.copy_(torch.from_numpy(np.array(variables["params"]["gamma"])))
      bn.bias.copy_(torch.from_numpy(np.array(variables["params"]["beta"])))
    bn.running_mean.copy_(torch.from_numpy(np.array(stats["moving_mean"])))
    bn.running_var.copy_(torch.from_numpy(np.array(stats["moving_variance"])))
  return bn
