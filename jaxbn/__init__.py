"""jaxbn: Keras' BatchNormalization for JAX, as pure functions and layers.

Functional core::

  config = jaxbn.BatchNormConfig(momentum=0.9)
  params, state = jaxbn.init(config, x.shape)
  y, state = jaxbn.apply(config, params, state, x, training=True)

Flax Linen: ``jaxbn.BatchNormalization(...)`` with Keras' arguments; Flax NNX:
``jaxbn.nnx``; Equinox: ``jaxbn.equinox``; Keras 3: ``jaxbn.keras``.

The package, from the layers users call down to the passes over the data::

  layers        linen.py, nnx.py, equinox.py, keras.py: thin wrappers that
                build a config once and call core.apply
  api           core.py: init/apply, batch views (ghost batches, masks),
                renorm corrections, gradient accumulation, the
                moving-statistics update; config.py: BatchNormConfig, every
                validation (the layer's arguments at construction, a call's
                input, mask and variables at trace time), the config resolved
                per input shape, the state entries it keeps
  math          closed_form.py: training-mode batch norm as one custom VJP
                (the closed-form backward) and its autodiff reference;
                stats.py: moments (each algorithm's a stats.Triple: count,
                mean, M2), units, their merge across devices and virtual
                batches, the overflow guard;
                affine.py: (x - mean) a + b, epsilon, the ReLU gate;
                moving_averages.py: the EMA
  passes        passes.py: the one door to the CPU kernels (moments, output,
                backward), XLA otherwise; cpu_kernels.py: their bindings
                and when they apply; csrc/: the C++ (common.h, one header
                per pass, kernels.cc: the FFI handlers, python_module.cc)
  switches      modes.py: what a trace decides and sees: kernels
                on/off/auto, the statistics algorithm (CPU or GPU/TPU), the
                overflow guard, the platform it is lowered for (sibling sums
                laid out per compiler), the mesh axes its values vary over;
                eager.py: eager calls as cached compiled programs;
                sharding.py: apply_local
  beside        penalties.py, model_penalties.py (regularizers,
                constraints); initializers.py, keras_names.py; interop/
                (Keras, PyTorch, Flax weights and models); tools/ (Precise
                BN, folding); traffic.py (bytes a compiled program moves);
                bench.py, bench_accelerator.py, info.py (commands)

The route of x through ``apply(..., training=True)``: ``core.apply``
checks the input (``config.check_input`` and its neighbours), resolves the
config for its shape and lays out ghost
batches and masks (``core._batch_view``); ``closed_form.train`` runs the
forward: ``passes.decide`` settles once whether the CPU kernels take its
passes, ``stats.in_units`` takes the moments through ``passes.moments`` (a
CPU kernel or XLA's reductions, in power-of-two units where a channel's
spread needs them), ``stats.merge_across_devices`` combines them
with one all-reduce under ``axis_name``, renorm's corrections come from
``core._corrections``, and ``passes.normalize`` writes y. The moving
statistics then update in ``core._updated_state`` (``moving_averages.ema``).
Under ``grad`` the backward is ``closed_form._bwd`` -> ``passes.backward``:
one CPU kernel call, or two XLA passes (sums, then dx) with one all-reduce
between them across devices.
"""
from jaxbn import interop, modes, tools
from jaxbn.interop import (from_flax, from_keras, from_torch, keras_config,
                           keras_model_variables, to_keras, to_torch,
                           torch_model_variables)
from jaxbn.tools import fold_into_kernel, precise_statistics
from jaxbn.config import BatchNormConfig, RenormClipping, state_names
from jaxbn.core import apply, init, init_params, init_state
from jaxbn.linen import BatchNormalization
from jaxbn.model_penalties import (LayerInfo, collect_layers, constrain,
                                   model_regularization_loss, project)
from jaxbn.moving_averages import ema
from jaxbn.penalties import apply_constraints, regularization_loss
from jaxbn.sharding import apply_local
from jaxbn.stats import Moments, moments

__version__ = "0.1.0"


def __getattr__(name):
  # imported on first use: Equinox is optional (pip install jaxbn[equinox]),
  # and flax.nnx costs a third of jaxbn's import time
  if name in ("equinox", "from_equinox", "nnx"):
    import importlib
    module = importlib.import_module(f"jaxbn.{name.replace('from_', '')}")
    return module.from_equinox if name == "from_equinox" else module
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
