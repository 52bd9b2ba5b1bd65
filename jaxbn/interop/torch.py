"""PyTorch ``BatchNorm1d/2d/3d`` <-> jaxbn.

PyTorch's conventions differ from Keras' in three ways that break ported
models: its ``momentum`` is the weight of the *new* value (Keras' is
``1 - momentum``), its default ``eps`` is 1e-5 (Keras: 1e-3), and its running
variance is Bessel-corrected (unbiased). ``from_torch`` converts the first,
keeps the second, and selects ``moving_variance_estimator='unbiased'``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from jaxbn import optional
from jaxbn.linen import BatchNormalization


def _is_torch_batch_norm(module) -> bool:
  torch = optional.require("torch")
  return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def from_torch(bn, *, axis: int = 1, name: str | None = None,
               axis_name: Any = None) -> tuple[BatchNormalization, dict]:
  """``(module, variables)`` equal to a ``torch.nn.BatchNorm{1,2,3}d`` or
  ``SyncBatchNorm``.

  ``axis`` is the channel axis of the JAX model's input: 1 for PyTorch's
  NC... layout, -1 for a channels-last mirror (the variables are per channel
  either way). ``name`` names the module. Parameters keep the torch tensors'
  dtype; the running statistics become float32 (float64 stays float64): a
  ``.half()`` module's float16 averages would stall (see
  ``jaxbn.init_state``). ``momentum=None`` (PyTorch's cumulative average)
  and ``track_running_stats=False`` have no Keras equivalent and raise.

  ``SyncBatchNorm`` takes its statistics over every process of its process
  group; in JAX that group is a mapped axis (``pmap``/``shard_map``), which
  ``axis_name`` names: the module then computes its statistics across it
  (for a subgroup, ``module.clone(axis_index_groups=...)``). Without
  ``axis_name`` a SyncBatchNorm raises rather than silently use per-device
  statistics.
  """
  if not _is_torch_batch_norm(bn):
    raise TypeError(f"from_torch expects torch.nn.BatchNorm1d/2d/3d or "
                    f"SyncBatchNorm; got {type(bn).__name__}.")
  if _is_sync(bn) and axis_name is None:
    raise ValueError(
        "from_torch: a torch SyncBatchNorm takes its statistics across its "
        "process group; name the JAX axis the batch is split over, e.g. "
        "from_torch(bn, axis_name='batch') for a model run under "
        "shard_map/pmap with that axis. (For per-device statistics convert it "
        "to a BatchNorm first.)")
  if axis_name is not None and not _is_sync(bn):
    raise ValueError(
        f"from_torch: axis_name={axis_name!r} is for a SyncBatchNorm; a "
        f"{type(bn).__name__} takes per-device statistics. Set it on the "
        "returned module instead: module.clone(axis_name=...).")
  _check_portable(bn)
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f"from_torch: `axis` must be one int (the channel axis "
                    f"of the JAX input); got {axis!r}.")
  module = BatchNormalization(
      axis=axis, momentum=1.0 - float(bn.momentum), epsilon=float(bn.eps),
      center=bool(bn.affine), scale=bool(bn.affine),
      moving_variance_estimator="unbiased", name=name, axis_name=axis_name)
  return module, _variables(bn)


def _check_portable(bn) -> None:
  """Raises for what Keras' moving averages cannot express."""
  if bn.momentum is None:
    raise ValueError(
        "torch BatchNorm with momentum=None keeps a cumulative average, which "
        "Keras' moving average cannot express; set bn.momentum (e.g. 0.1) or "
        "recompute population statistics with jaxbn.tools.precise_statistics.")
  if not bn.track_running_stats or bn.running_mean is None:
    raise ValueError(
        "torch BatchNorm with track_running_stats=False has no running "
        "statistics to port; it always normalizes with batch statistics.")


def _is_sync(bn) -> bool:
  torch = optional.require("torch")
  return isinstance(bn, torch.nn.SyncBatchNorm)


def _variables(bn) -> dict:
  """``{'params', 'batch_stats'}`` of a torch batch norm, statistics in
  float32 at least."""
  # copy: torch updates its buffers in place, numpy() would share them
  to_np = lambda t: np.array(t.detach().cpu().numpy())
  params = {}
  if bn.affine:
    params = {"gamma": to_np(bn.weight), "beta": to_np(bn.bias)}
  stats = {}
  for key, buffer in (("moving_mean", bn.running_mean),
                      ("moving_variance", bn.running_var)):
    value = to_np(buffer)
    stats[key] = value.astype(np.promote_types(value.dtype, np.float32))
  return {"params": params, "batch_stats": stats}


def torch_model_variables(model, *, axis: int = 1) -> dict[str, Any]:
  """Every BatchNorm of a torch module tree as Flax variables, by path.

  Returns ``{'params': tree, 'batch_stats': tree}`` where each tree nests
  dicts along the torch path (``layer1.0.bn1`` ->
  ``tree['layer1']['0']['bn1']``), so a Flax mirror whose submodules carry
  the torch attribute names takes it as is; ``axis`` as in
  :func:`from_torch` (-1 for a channels-last mirror). Layers without affine
  parameters have no 'params' entry.
  """
  out = {"params": {}, "batch_stats": {}}
  found = False
  for path, sub in model.named_modules():
    if not _is_torch_batch_norm(sub):
      continue
    found = True
    _check_portable(sub)
    variables = _variables(sub)
    for collection, values in variables.items():
      if not values:
        continue
      node = out[collection]
      for part in path.split(".") if path else ["batch_norm"]:
        node = node.setdefault(part, {})
      node.update(values)
  if not found:
    raise ValueError(f"torch_model_variables: {type(model).__name__} has no "
                     "BatchNorm1d/2d/3d submodule.")
  return out


def to_torch(module: BatchNormalization, variables, dims: int = 2):
  """A ``torch.nn.BatchNorm{dims}d`` with the module's numbers.

  Any single channel axis maps onto torch's axis 1 (permute channels-last
  inputs to NC... before calling it). PyTorch's running variance is always
  Bessel-corrected, so a module whose moving variance is not (``'biased'``,
  or ``'keras'`` where Keras would not run its fused kernel) raises: its
  training updates would differ.
  """
  torch = optional.require("torch")
  config = module.config
  if (not isinstance(config.axis, int) or config.renorm
      or config.virtual_batch_size is not None):
    raise ValueError(
        "Only layers with one channel axis and without renorm or virtual "
        f"batches map onto torch BatchNorm; got axis={config.axis!r}, "
        f"renorm={config.renorm}, "
        f"virtual_batch_size={config.virtual_batch_size}.")
  if config.activation is not None:
    raise ValueError(
        f"activation={config.activation!r} has no torch BatchNorm "
        "equivalent; use module.clone(activation=None) and follow the "
        "BatchNorm with torch.nn.ReLU() (the same numbers).")
  if config.accumulation_steps != 1:
    raise ValueError(
        f"accumulation_steps={config.accumulation_steps} has no torch "
        "BatchNorm equivalent (it updates its running statistics on every "
        "call); use module.clone(accumulation_steps=1): inference is the "
        "same.")
  if config.center != config.scale:
    raise ValueError("torch BatchNorm has gamma and beta together (affine); "
                     f"got center={config.center}, scale={config.scale}.")
  if dims not in (1, 2, 3):
    raise ValueError(f"`dims` must be 1, 2 or 3 (BatchNorm1d/2d/3d); got "
                     f"{dims!r}.")
  resolved = config.resolve((2,) * (dims + 2))  # torch's input rank
  if not resolved.bessel:
    raise ValueError(
        f"moving_variance_estimator={config.moving_variance_estimator!r} "
        f"gives a biased moving variance for BatchNorm{dims}d inputs, but "
        "PyTorch's running variance is Bessel-corrected. Use "
        "module.clone(moving_variance_estimator='unbiased') to accept "
        "PyTorch's training rule (inference numbers are the same).")
  cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
         3: torch.nn.BatchNorm3d}[dims]
  stats = variables["batch_stats"]
  mean = np.asarray(stats["moving_mean"])
  dtype = {np.dtype(np.float64): torch.float64,
           np.dtype(np.float16): torch.float16}.get(mean.dtype, torch.float32)
  bn = cls(int(mean.size), eps=config.epsilon, momentum=1.0 - config.momentum,
           affine=config.scale, dtype=dtype)
  to_tensor = lambda v: torch.from_numpy(np.array(v).reshape(-1)).to(dtype)
  with torch.no_grad():
    if config.scale:
      bn.weight.copy_(to_tensor(variables["params"]["gamma"]))
      bn.bias.copy_(to_tensor(variables["params"]["beta"]))
    bn.running_mean.copy_(to_tensor(stats["moving_mean"]))
    bn.running_var.copy_(to_tensor(stats["moving_variance"]))
  return bn
