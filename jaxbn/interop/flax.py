"""``flax.linen.BatchNorm`` variables -> jaxbn.

Flax uses Keras' momentum convention and a biased running variance; its
variables are named ``scale``/``bias`` and ``mean``/``var`` and, for several
feature axes, shaped by the feature axes only.
"""
from __future__ import annotations

import numpy as np

from jaxbn.interop.flax_models import flax_config
from jaxbn.linen import CONFIG_FIELDS, BatchNormalization


def from_flax(bn, variables, *, input_rank: int | None = None,
              name: str | None = None) -> tuple[BatchNormalization, dict]:
  """``(module, variables)`` equal to a ``flax.linen.BatchNorm`` and its vars.

  ``input_rank`` is needed only when ``bn.axis`` names several axes (jaxbn
  keeps Keras' full-rank variable shape there); ``name`` names the module.
  """
  import flax.linen as nn
  if not isinstance(bn, nn.BatchNorm):
    raise TypeError(f"from_flax expects flax.linen.BatchNorm; got "
                    f"{type(bn).__name__}.")
  config = flax_config(bn)
  axis = config.axis
  module = BatchNormalization(
      **{f: getattr(config, f) for f in CONFIG_FIELDS},
      axis_name=bn.axis_name, axis_index_groups=bn.axis_index_groups,
      name=name)
  shape = None
  if not isinstance(axis, int):
    if input_rank is None:
      raise ValueError(f"axis={axis!r}: pass input_rank= to lay the "
                       "variables out in Keras' full-rank shape.")
    axes = sorted(a % input_rank for a in axis)
    stats = variables["batch_stats"]["mean"]
    sizes = iter(np.shape(stats))
    shape = tuple(next(sizes) if i in axes else 1 for i in range(input_rank))
  reshape = lambda v: np.asarray(v, np.float32) if shape is None else \
      np.asarray(v, np.float32).reshape(shape)
  params = {}
  if bn.use_scale:
    params["gamma"] = reshape(variables["params"]["scale"])
  if bn.use_bias:
    params["beta"] = reshape(variables["params"]["bias"])
  stats = {"moving_mean": reshape(variables["batch_stats"]["mean"]),
           "moving_variance": reshape(variables["batch_stats"]["var"])}
  return module, {"params": params, "batch_stats": stats}
