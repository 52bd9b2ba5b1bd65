"""Weight and config conversion: Keras (tf_keras and Keras 3), PyTorch, Flax."""
from jaxbn.interop.flax import from_flax
from jaxbn.interop.keras import (from_keras, keras_config,
                                 keras_model_variables, to_keras)
from jaxbn.interop.torch import from_torch, to_torch, torch_model_variables

__all__ = ["from_flax", "from_keras", "from_torch", "keras_config",
           "keras_model_variables", "to_keras", "to_torch",
           "torch_model_variables"]
