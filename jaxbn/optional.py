"""Optional dependencies, imported where used, with an error that names
the extra to install."""
from __future__ import annotations

import importlib

# module -> (pip distribution, jaxbn extra)
PACKAGES = {
    "tf_keras": ("tf-keras", "interop"),
    "keras": ("keras", "interop"),
    "torch": ("torch", "interop"),
    "equinox": ("equinox", "equinox"),
}


def require(module: str):
  """``module``, imported; an ImportError naming the extra if missing."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    package, extra = PACKAGES[module]
    raise ImportError(
        f"This needs {module}: pip install 'jaxbn[{extra}]' (or pip install "
        f"{package}).") from error
