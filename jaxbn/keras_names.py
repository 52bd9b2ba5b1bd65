"""Resolution of Keras-style object specifications.

Keras accepts an initializer, regularizer or constraint as a string name
(``'l2'``), a serialized dict (``{'class_name': 'L2', 'config': {'l2': 0.01}}``),
an object, or a plain callable. ``resolve`` turns any of these into one object,
with errors that name the argument and list what is accepted.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping


def snake_case(name: str) -> str:
  """'RandomNormal' -> 'random_normal', 'L1L2' -> 'l1_l2', 'zeros' -> 'zeros'."""
  name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
  name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
  return re.sub(r"(?<=[0-9])(?=[A-Z])", "_", name).lower()


def _freeze(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


@dataclasses.dataclass(frozen=True)
class KerasObject:
  """A Keras-named object: a class name plus its (frozen) constructor config.

  Subclasses implement ``__call__``. Instances are hashable, so configs that
  hold them stay usable as static arguments of ``jax.jit``.
  """

  class_name: str
  config_items: tuple = ()

  @property
  def config(self) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in self.config_items}

  def serialize(self) -> dict:
    """The dict Keras writes for this object in a layer config."""
    return {"module": self.keras_module, "class_name": self.class_name,
            "config": self.config, "registered_name": None}

  keras_module = "keras"


def resolve(value: Any, *, argument: str, registry: Mapping[str, tuple],
            factory: Callable[[str, dict], Any], kind: str,
            allow_none: bool = True) -> Any:
  """Turns a Keras-style spec into an object built by ``factory``.

  ``registry`` maps snake-case names to ``(class_name, default_config)``.
  """
  if value is None:
    if allow_none:
      return None
    raise ValueError(f"`{argument}` must not be None; pass a {kind} name "
                     f"such as {sorted(registry)[:3]} or a callable.")
  if isinstance(value, KerasObject) or (callable(value)
                                        and not isinstance(value, type)):
    return value
  if isinstance(value, str):
    key = snake_case(value)
    if key not in registry:
      raise ValueError(
          f"Unknown {kind} name for `{argument}`: {value!r}. Use one of "
          f"{sorted(registry)}, a serialized Keras dict or a callable.")
    class_name, defaults = registry[key]
    return factory(class_name, dict(defaults))
  if isinstance(value, Mapping):
    if "class_name" not in value:
      raise ValueError(
          f"`{argument}`={value!r} is a dict without 'class_name'; Keras "
          "serializes objects as {'class_name': ..., 'config': {...}}.")
    key = snake_case(str(value["class_name"]))
    if key not in registry:
      raise ValueError(
          f"Unknown {kind} class for `{argument}`: {value['class_name']!r}. "
          f"Supported: {sorted(registry)}; pass a callable for anything else.")
    class_name, defaults = registry[key]
    config = dict(defaults)
    config.update(value.get("config") or {})
    unknown = set(config) - set(defaults)
    if unknown:
      raise ValueError(
          f"`{argument}`: {class_name} does not take {sorted(unknown)}; its "
          f"arguments are {sorted(defaults)}.")
    return factory(class_name, config)
  raise TypeError(
      f"`{argument}` must be a {kind} name (str), a serialized Keras dict, or "
      f"a callable; got {type(value).__name__}: {value!r}.")


def serialize(value: Any) -> Any:
  """The Keras config value for a resolved object (callables pass through)."""
  if value is None:
    return None
  if isinstance(value, KerasObject):
    return value.serialize()
  return value


def frozen_items(config: Mapping[str, Any]) -> tuple:
  return tuple((k, _freeze(v)) for k, v in config.items())
