"""jaxbn: Keras' BatchNormalization for JAX, as pure functions and Flax layers.

Functional core::

  config = jaxbn.BatchNormConfig(momentum=0.9)
  params, state = jaxbn.init(config, x.shape)
  y, state = jaxbn.apply(config, params, state, x, training=True)

Flax Linen: ``jaxbn.BatchNormalization(...)`` with Keras' arguments.
"""
from jaxbn import interop, modes, nnx, tools
from jaxbn.interop import (from_flax, from_keras, from_torch, keras_config,
                           keras_model_variables, to_keras, to_torch,
                           torch_model_variables)
from jaxbn.tools import fold_into_kernel, precise_statistics
from jaxbn.config import BatchNormConfig, RenormClipping
from jaxbn.core import apply, init, init_params, init_state, state_names
from jaxbn.linen import BatchNormalization
from jaxbn.model_penalties import (LayerInfo, collect_layers, constrain,
                                   model_regularization_loss, project)
from jaxbn.moving_averages import ema
from jaxbn.penalties import apply_constraints, regularization_loss
from jaxbn.sharding import apply_local
from jaxbn.stats import Moments, moments

__version__ = "0.1.0"


def __getattr__(name):
  # Equinox is optional (pip install jaxbn[equinox]): imported on first use
  if name in ("equinox", "from_equinox"):
    import importlib
    module = importlib.import_module("jaxbn.equinox")
    return module if name == "equinox" else module.from_equinox
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


__all__ = [
    "BatchNormConfig",
    "BatchNormalization",
    "LayerInfo",
    "Moments",
    "RenormClipping",
    "apply",
    "apply_constraints",
    "apply_local",
    "collect_layers",
    "constrain",
    "ema",
    "fold_into_kernel",
    "from_flax",
    "from_keras",
    "from_torch",
    "init",
    "init_params",
    "init_state",
    "interop",
    "keras_config",
    "keras_model_variables",
    "model_regularization_loss",
    "modes",
    "moments",
    "nnx",
    "precise_statistics",
    "project",
    "regularization_loss",
    "state_names",
    "to_keras",
    "to_torch",
    "tools",
    "torch_model_variables",
]
