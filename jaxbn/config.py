"""``BatchNormConfig``: Keras' arguments, defaults and every validation.

A config is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit`` and a field of a Flax module. Argument errors are raised here, at
construction; errors that need the input's shape (rank, axes, ``fused=True``
for this rank) are raised by ``resolve`` at trace time, and those that need the
variables or the batch (channel sizes, a batch size ``virtual_batch_size`` does
not divide, the mask, ``training``) by the checks at the end of this module,
which ``jaxbn.apply`` and the layers call at trace time. Every message names
the argument, the value received and the fix.

The state entries a config keeps (:func:`state_names`) live here too: the
checks of a call's state read them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import initializers, keras_names, penalties

Axis = Union[int, Sequence[int]]

_KERAS_FUSED_AXES = (-4, -3, -1, 1, 3, 4)
_ESTIMATORS = ("keras", "biased", "unbiased")
_LAYOUTS = ("strided", "contiguous")
_ACTIVATIONS = (None, "relu")
# Keras layer-base keys that a Keras layer config carries besides the
# constructor arguments.
_KERAS_BASE_KEYS = ("name", "dtype", "batch_input_shape", "input_shape",
                    "dynamic")


@dataclasses.dataclass(frozen=True)
class RenormClipping:
  """Bounds of Batch Renorm's corrections: r in [rmin, rmax], d in [-dmax, dmax].

  ``None`` means no bound (Keras' default for a missing key). A bound may also
  be a callable of the training step (an int32 array), e.g. an optax schedule,
  to ramp the bounds up as the paper does.
  """

  rmax: Any = None
  rmin: Any = None
  dmax: Any = None

  @property
  def is_scheduled(self) -> bool:
    return any(callable(v) for v in (self.rmax, self.rmin, self.dmax))

  def as_dict(self) -> dict:
    return {k: v for k, v in (("rmax", self.rmax), ("rmin", self.rmin),
                              ("dmax", self.dmax)) if v is not None}


def cached_when_hashable(maxsize: int):
  """``functools.lru_cache(maxsize)`` for facts derived from a config, which
  may hold an unhashable field (a user's callable): those calls compute
  the answer each time instead."""
  def wrap(fn):
    cached = functools.lru_cache(maxsize=maxsize)(fn)

    @functools.wraps(fn)
    def call(*args):
      try:
        return cached(*args)
      except TypeError:  # an unhashable argument
        return fn(*args)
    return call
  return wrap


class Resolved(NamedTuple):
  """What a config means for one input shape (computed at trace time)."""

  axes: tuple  # channel axes, sorted, non-negative
  reduction_axes: tuple  # every other axis
  param_shape: tuple  # Keras' variable shape (without the virtual-batch axis)
  broadcast_shape: tuple  # param values reshaped to broadcast against x
  keras_fused: bool  # Keras would run its fused kernel for this input
  # moving_variance follows the Bessel-corrected batch variance
  # (``moving_variance_estimator``)
  bessel: bool


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
  """Every argument of ``tf.keras.layers.BatchNormalization`` (TF 2.4 API).

  Names and defaults are Keras'. jaxbn adds:

  * ``moving_variance_estimator``: which batch variance feeds
    ``moving_variance``. ``'keras'`` (default) reproduces Keras: Bessel-
    corrected (``n/(n-1)``) where Keras runs its fused kernel (4-D input with
    axis 1/3 or 5-D with axis 1/4, no renorm/virtual batches/adjustment, and
    ``fused`` not False), biased elsewhere. ``'biased'`` always uses the biased
    variance (Flax, Haiku); ``'unbiased'`` always the corrected one (PyTorch).
    The normalized output always uses the biased batch variance.
  * ``virtual_batch_layout``: ``'strided'`` (Keras: virtual batch g holds rows
    g, g+G, g+2G, ... with G = batch / virtual_batch_size) or
    ``'contiguous'`` (rows [g*v, (g+1)*v)).
  * ``skip_nonfinite_updates``: when True, a channel whose batch mean or
    variance is NaN/Inf keeps its moving statistics (and renorm statistics)
    unchanged for that step. Off by default, as in Keras, where one batch with
    a NaN poisons the moving averages for good.
  * ``accumulation_steps``: ``k`` (default 1) for gradient accumulation over
    ``k`` micro-batches: each training call normalizes with its own batch's
    statistics, and the moving statistics are updated once, on every k-th
    call, from the count-weighted merge of the k calls' statistics (the rule
    of virtual batches): k calls equal one call on the k micro-batches
    stacked with ``virtual_batch_size = B / k`` and
    ``virtual_batch_layout='contiguous'``. The state holds the merge so far
    (``ACCUMULATOR_NAMES``, below) and ``accumulation_step``, the calls
    since the last update. Renorm's ``r``/``d`` come from each call's own
    statistics against the averages of the accumulation's start (no update
    happens before its k-th call).
  * ``activation``: ``None`` (Keras) or ``'relu'``: ``y = max(BN(x), 0)``
    in one layer, as TensorFlow's fused batch norm with ``activation_mode``.
    The same numbers as a ReLU after the layer, but the training backward
    gates the gradient inside its own passes instead of a separate pass over
    the data (the layer saves no more than without it). Keras'
    BatchNormalization has no such argument: converting a layer that uses it
    to Keras or PyTorch raises.
  """

  axis: Axis = -1
  momentum: float = 0.99
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  beta_initializer: Any = "zeros"
  gamma_initializer: Any = "ones"
  moving_mean_initializer: Any = "zeros"
  moving_variance_initializer: Any = "ones"
  beta_regularizer: Any = None
  gamma_regularizer: Any = None
  beta_constraint: Any = None
  gamma_constraint: Any = None
  renorm: bool = False
  renorm_clipping: Optional[Union[Mapping[str, Any], RenormClipping]] = None
  renorm_momentum: float = 0.99
  fused: Optional[bool] = None
  trainable: bool = True
  virtual_batch_size: Optional[int] = None
  adjustment: Optional[Callable] = None
  moving_variance_estimator: str = "keras"
  virtual_batch_layout: str = "strided"
  skip_nonfinite_updates: bool = False
  activation: Optional[str] = None
  accumulation_steps: int = 1

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("axis", _check_axis(self.axis))
    set_("momentum", _check_unit_interval("momentum", self.momentum))
    set_("renorm_momentum",
         _check_unit_interval("renorm_momentum", self.renorm_momentum))
    _check_epsilon(self.epsilon)
    for name in ("center", "scale", "renorm", "trainable",
                 "skip_nonfinite_updates"):
      _check_bool(name, getattr(self, name))
    for name in ("beta_initializer", "gamma_initializer",
                 "moving_mean_initializer", "moving_variance_initializer"):
      set_(name, initializers.get(getattr(self, name), name))
    for name in ("beta_regularizer", "gamma_regularizer"):
      set_(name, penalties.get_regularizer(getattr(self, name), name))
    for name in ("beta_constraint", "gamma_constraint"):
      set_(name, penalties.get_constraint(getattr(self, name), name))
    set_("renorm_clipping", _check_renorm_clipping(self.renorm_clipping))
    if self.fused not in (None, True, False):
      raise TypeError(f"`fused` must be None, True or False; got "
                      f"{self.fused!r}.")
    if self.virtual_batch_size is not None:
      vbs = self.virtual_batch_size
      if (isinstance(vbs, bool) or not isinstance(vbs, numbers.Integral)
          or vbs <= 0):
        raise ValueError(
            "`virtual_batch_size` must be a positive integer that divides the "
            f"training batch size, or None; got {vbs!r}.")
      set_("virtual_batch_size", int(vbs))
      axes = (self.axis,) if isinstance(self.axis, int) else self.axis
      if 0 in axes:
        raise ValueError(
            "With `virtual_batch_size`, axis 0 is the batch axis and cannot be "
            f"a channel axis; got axis={self.axis!r}. Remove 0 from `axis`.")
      if self.adjustment is not None:
        raise ValueError(
            "`adjustment` cannot be combined with `virtual_batch_size` (as in "
            "Keras); set one of them to None.")
    if self.adjustment is not None and not callable(self.adjustment):
      raise TypeError(
          "`adjustment` must be a callable `(shape, key) -> (scale, bias)` or "
          f"None; got {type(self.adjustment).__name__}.")
    if self.moving_variance_estimator not in _ESTIMATORS:
      raise ValueError(
          f"`moving_variance_estimator` must be one of {_ESTIMATORS}; got "
          f"{self.moving_variance_estimator!r}.")
    if self.virtual_batch_layout not in _LAYOUTS:
      raise ValueError(
          f"`virtual_batch_layout` must be one of {_LAYOUTS}; got "
          f"{self.virtual_batch_layout!r}.")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
          f"`activation` must be None or 'relu'; got {self.activation!r}. "
          "Apply any other activation after the layer.")
    steps = self.accumulation_steps
    if (isinstance(steps, bool) or not isinstance(steps, numbers.Integral)
        or steps < 1):
      raise ValueError(
          "`accumulation_steps` must be a positive integer (the micro-batches "
          f"per optimizer step; 1 for none); got {steps!r}.")
    set_("accumulation_steps", int(steps))
    if self.fused:
      self._raise_if_keras_fused_impossible()

  # ------------------------------------------------------------------ fused

  def _raise_if_keras_fused_impossible(self):
    """Keras' construction-time reasons to reject ``fused=True``."""
    fix = "Use fused=None (pick automatically) or fused=False."
    if self.renorm:
      raise ValueError(f"`fused=True` is not supported with `renorm=True`. "
                       f"{fix}")
    axes = (self.axis,) if isinstance(self.axis, int) else self.axis
    if len(axes) > 1 or axes[0] not in _KERAS_FUSED_AXES:
      raise ValueError(
          f"`fused=True` needs a single channel axis 1 or 3 (rank 4) or 1 or 4 "
          f"(rank 5); got axis={self.axis!r}. {fix}")
    if self.virtual_batch_size is not None:
      raise ValueError("`fused=True` is not supported with "
                       f"`virtual_batch_size`. {fix}")
    if self.adjustment is not None:
      raise ValueError(f"`fused=True` is not supported with `adjustment`. "
                       f"{fix}")

  @property
  def keras_fusable(self) -> bool:
    """Keras' input-independent conditions for its fused kernel."""
    if self.fused is False:
      return False
    try:
      self._raise_if_keras_fused_impossible()
    except ValueError:
      return False
    return True

  # ---------------------------------------------------------------- shapes

  def resolve(self, input_shape: Sequence[int]) -> Resolved:
    """Axes and shapes for an input; raises ValueError for misfits. Kept
    for each (config, shape): a layer and ``apply`` resolve the same input
    shape on every call."""
    return _resolved(self, tuple(input_shape))

  def _resolve(self, shape: tuple) -> Resolved:
    ndim = len(shape)
    if ndim < 2:
      raise ValueError(
          f"BatchNormalization expects an input of rank >= 2 (batch, ...); got "
          f"shape {shape}. Add a batch axis, e.g. x[None].")
    axes_in = (self.axis,) if isinstance(self.axis, int) else self.axis
    axes = []
    for a in axes_in:
      if not -ndim <= a < ndim:
        raise ValueError(
            f"`axis`={self.axis!r} is out of range for an input of rank "
            f"{ndim} (shape {shape}); valid axes are {-ndim}..{ndim - 1}.")
      axes.append(a % ndim)
    if len(set(axes)) != len(axes):
      raise ValueError(
          f"`axis`={self.axis!r} names the same axis twice for an input of "
          f"rank {ndim} (resolved to {axes}); list each channel axis once.")
    axes = tuple(sorted(axes))
    if self.virtual_batch_size is not None and 0 in axes:
      raise ValueError(
          f"`axis`={self.axis!r} resolves to the batch axis 0, which "
          "`virtual_batch_size` reserves; choose channel axes >= 1.")
    reduction_axes = tuple(i for i in range(ndim) if i not in axes)
    broadcast_shape = tuple(shape[i] if i in axes else 1 for i in range(ndim))
    param_shape = ((shape[axes[0]],) if len(axes) == 1 else broadcast_shape)
    if self.fused and ndim not in (4, 5):
      raise ValueError(
          f"`fused=True` supports only 4-D or 5-D inputs (as in Keras); got "
          f"shape {shape}. Use fused=None or fused=False.")
    keras_fused = self.keras_fusable and ndim in (4, 5) and (
        axes == (1,) or axes == (ndim - 1,))
    if self.fused and not keras_fused and ndim == 4:
      # Keras raises for 4-D inputs and silently falls back for 5-D ones.
      raise ValueError(
          f"`fused=True` needs axis 1 or {ndim - 1} for a {ndim}-D input; got "
          f"axis={self.axis!r}. Use fused=None or fused=False.")
    bessel = (keras_fused if self.moving_variance_estimator == "keras"
              else self.moving_variance_estimator == "unbiased")
    return Resolved(axes, reduction_axes, param_shape, broadcast_shape,
                    keras_fused, bessel)

  # ---------------------------------------------------------------- configs

  def get_config(self) -> dict:
    """Keras' ``get_config()`` keys and value formats."""
    axis = self.axis if isinstance(self.axis, int) else list(self.axis)
    if (self.virtual_batch_size is not None and isinstance(axis, list)
        and all(a >= 2 for a in axis)):
      # from_config reads such a list as a built Keras layer's, whose axes
      # count the virtual-batch axis Keras inserts: one axis is written as
      # the int (the same for Keras and jaxbn), several in that built form
      axis = axis[0] if len(axis) == 1 else [a + 1 for a in axis]
    config = {
        "trainable": self.trainable,
        "axis": axis,
        "momentum": self.momentum,
        "epsilon": self.epsilon,
        "center": self.center,
        "scale": self.scale,
    }
    for name in ("beta_initializer", "gamma_initializer",
                 "moving_mean_initializer", "moving_variance_initializer",
                 "beta_regularizer", "gamma_regularizer", "beta_constraint",
                 "gamma_constraint"):
      config[name] = keras_names.serialize(getattr(self, name))
    if self.renorm:
      config["renorm"] = True
      config["renorm_clipping"] = (self.renorm_clipping.as_dict()
                                   if self.renorm_clipping else {})
      config["renorm_momentum"] = self.renorm_momentum
    if self.virtual_batch_size is not None:
      config["virtual_batch_size"] = self.virtual_batch_size
    if self.fused is not None:
      config["fused"] = self.fused
    if self.moving_variance_estimator != "keras":
      config["moving_variance_estimator"] = self.moving_variance_estimator
    if self.virtual_batch_layout != "strided":
      config["virtual_batch_layout"] = self.virtual_batch_layout
    if self.skip_nonfinite_updates:
      config["skip_nonfinite_updates"] = True
    if self.activation is not None:
      config["activation"] = self.activation
    if self.accumulation_steps != 1:
      config["accumulation_steps"] = self.accumulation_steps
    return config

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *,
                  built: Optional[bool] = None, **overrides
                  ) -> "BatchNormConfig":
    """Builds a config from a Keras layer config dict (or ``get_config()``).

    Accepts tf_keras and Keras 3 configs of built and unbuilt layers:

    * A built tf_keras layer reports its axis as a list of non-negative
      axes, shifted by one with ``virtual_batch_size`` (Keras inserts the
      virtual-batch axis at build). ``built=None`` reads a list axis with
      ``virtual_batch_size`` whose axes are all >= 2 as that shifted form
      (an unbuilt layer's list cannot then be told apart: pass
      ``built=False`` for it); ``built=True``/``False`` says which it is.
    * A Keras 3 config (its ``dtype`` is a serialized ``DTypePolicy``)
      selects ``moving_variance_estimator='biased'``: Keras 3 never
      Bessel-corrects the moving variance.

    Keras' layer-base keys (``name``, ``dtype``, ...) are ignored;
    ``synchronized=True`` asks for cross-device statistics, which jaxbn gets
    from ``axis_name`` (raise rather than silently compute local statistics).
    """
    config = dict(config)
    config.update(overrides)
    if _is_keras3_config(config):
      config.setdefault("moving_variance_estimator", "biased")
    for key in _KERAS_BASE_KEYS:
      config.pop(key, None)
    if config.pop("synchronized", False):
      raise ValueError(
          "The Keras config has synchronized=True: jaxbn synchronizes "
          "statistics through `axis_name`. Drop 'synchronized' from the dict "
          "and pass axis_name=... to the layer or to jaxbn.apply.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
      raise ValueError(
          f"Unknown BatchNormalization config keys {unknown}; known keys are "
          f"{sorted(fields)}.")
    axis = config.get("axis", -1)
    if not isinstance(axis, (int, str)) and hasattr(axis, "__iter__"):
      axis = [int(a) for a in axis]  # Keras' list (or its ListWrapper)
      if config.get("virtual_batch_size") is not None:
        if built is None:
          built = all(a >= 2 for a in axis)
        if built:
          axis = [a - 1 for a in axis]
      config["axis"] = tuple(axis)
    return cls(**config)


def _is_keras3_config(config: Mapping[str, Any]) -> bool:
  dtype = config.get("dtype")
  return isinstance(dtype, Mapping) and dtype.get("module") == "keras"


# ------------------------------------------------------------------ checks


def _check_axis(axis):
  if isinstance(axis, bool):
    raise TypeError(f"`axis` must be an int or a list/tuple of ints; got "
                    f"{axis!r}.")
  if isinstance(axis, numbers.Integral):
    return int(axis)
  if isinstance(axis, (list, tuple)):
    if not axis:
      raise ValueError("`axis` must name at least one channel axis; got an "
                       "empty list. Use e.g. axis=-1.")
    for a in axis:
      if isinstance(a, bool) or not isinstance(a, numbers.Integral):
        raise TypeError(f"`axis` must contain only ints; got {axis!r}.")
    axis = tuple(int(a) for a in axis)
    if len(set(axis)) != len(axis):
      raise ValueError(f"`axis`={list(axis)!r} contains duplicates; list each "
                       "channel axis once.")
    return axis
  raise TypeError(f"`axis` must be an int or a list/tuple of ints; got "
                  f"{type(axis).__name__}: {axis!r}.")


def _check_unit_interval(name, value):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a float in [0, 1]; got "
                    f"{type(value).__name__}: {value!r}.")
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        f"`{name}` must be in [0, 1] (Keras' convention: the weight of the old "
        f"average); got {value!r}. Porting from PyTorch? Use 1 - momentum.")
  return float(value)


def _check_epsilon(value):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`epsilon` must be a non-negative float; got "
                    f"{type(value).__name__}: {value!r}.")
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"`epsilon` must be a finite float >= 0; got {value!r} "
                     "(Keras' default is 1e-3).")


def _check_bool(name, value):
  if not isinstance(value, bool):
    raise TypeError(f"`{name}` must be True or False; got "
                    f"{type(value).__name__}: {value!r}.")


def _check_renorm_clipping(value):
  if value is None:
    return None
  if isinstance(value, RenormClipping):
    items = {"rmax": value.rmax, "rmin": value.rmin, "dmax": value.dmax}
  elif isinstance(value, Mapping) or hasattr(value, "items"):
    items = dict(value.items())
    unknown = set(items) - {"rmax", "rmin", "dmax"}
    if unknown:
      raise ValueError(
          f"`renorm_clipping`={value!r} has unknown keys {sorted(unknown)}; "
          "the supported keys are 'rmax', 'rmin' and 'dmax'.")
  else:
    raise TypeError(
        "`renorm_clipping` must be a dict with keys 'rmax', 'rmin', 'dmax' "
        f"or None; got {type(value).__name__}: {value!r}.")
  for key, bound in items.items():
    if bound is None or callable(bound):
      continue
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
      raise TypeError(
          f"`renorm_clipping['{key}']` must be a number, a callable of the "
          f"training step, or None; got {bound!r}.")
    if bound < 0 or math.isnan(bound):
      raise ValueError(f"`renorm_clipping['{key}']` must be >= 0; got "
                       f"{bound!r}.")
  # r = 1 (the batch and moving statistics agree) must stay reachable; a
  # schedule's values are its own business.
  rmin, rmax = items.get("rmin"), items.get("rmax")
  is_number = lambda v: isinstance(v, numbers.Real)
  if is_number(rmax) and rmax < 1:
    raise ValueError(
        f"`renorm_clipping['rmax']`={rmax!r} is below 1, so r could never be "
        "1; use rmax >= 1 (Keras' paper schedule ramps it from 1 to 3).")
  if is_number(rmin) and rmin > 1:
    raise ValueError(
        f"`renorm_clipping['rmin']`={rmin!r} is above 1, so r could never be "
        "1; use 0 <= rmin <= 1 (e.g. 1 / rmax).")
  return RenormClipping(**items)


@cached_when_hashable(maxsize=512)
def _resolved(config: BatchNormConfig, shape: tuple) -> Resolved:
  return config._resolve(shape)


# ------------------------------------------------ the state a config keeps


# The state of gradient accumulation (``accumulation_steps > 1``): the calls
# since the last update of the moving statistics, and the merge of their
# statistics so far (a ``core.Pooled`` in units, see ``stats.in_units``).
ACCUMULATION_STEP = "accumulation_step"
ACCUMULATOR_NAMES = ("accumulated_count", "accumulated_mean",
                     "accumulated_variance", "accumulated_update_variance",
                     "accumulated_inv_unit")
# integer state entries: counters, not statistics
COUNTER_NAMES = ("renorm_step", ACCUMULATION_STEP)


def state_names(config: BatchNormConfig) -> tuple:
  """Names of the state entries ``init_state`` creates for this config, in
  its order."""
  names = ("moving_mean", "moving_variance")
  if config.renorm:
    names += ("moving_stddev", "renorm_mean", "renorm_stddev")
    if (config.renorm_clipping is not None
        and config.renorm_clipping.is_scheduled):
      names += ("renorm_step",)
  if config.accumulation_steps > 1:
    names += ACCUMULATOR_NAMES + (ACCUMULATION_STEP,)
  return names


# ------------------------------------------- a call's arguments, at trace time


def check_param_dtype(dtype):
  """A TypeError unless ``dtype`` is a float dtype (for the variables)."""
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"`dtype` of the variables must be a float dtype; got "
                    f"{dtype!r}. Use jnp.float32.")


def check_partition_names(names, shape):
  """``names`` (one mesh axis name or None per dimension of the variables,
  whose ``shape`` gamma, beta and every moving statistic share) as a tuple;
  None stays None. A ValueError names a wrong length or entry."""
  if names is None:
    return None
  if isinstance(names, str):
    names = (names,)
  names = tuple(names)
  if len(names) != len(shape) or not all(
      n is None or isinstance(n, str) for n in names):
    raise ValueError(
        f"`partition_names`={names!r} must give one mesh axis name (or None) "
        f"per dimension of the variables, whose shape is {tuple(shape)}: "
        f"e.g. {(('model',) + (None,) * (len(shape) - 1))!r}.")
  return names


def check_input(x):
  """``x`` as an array; integer and bool inputs become float32 (Keras casts
  them to the layer's float32 compute dtype)."""
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    try:
      x = jnp.asarray(x)
    except TypeError:
      raise TypeError(
          f"BatchNormalization expects a numeric array input; got "
          f"{type(x).__name__}. Pass a float array.") from None
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    return x.astype(jnp.float32)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(
        f"BatchNormalization does not normalize complex input (dtype "
        f"{x.dtype}, shape {tuple(x.shape)}): Keras rejects it and a complex "
        "batch norm has several incompatible definitions. Normalize the real "
        "and imaginary parts as channels, e.g. jnp.concatenate([x.real, "
        "x.imag], axis=-1).")
  raise TypeError(
      f"BatchNormalization expects a floating-point input; got dtype "
      f"{x.dtype} (shape {tuple(x.shape)}). Cast it, e.g. "
      "x.astype(jnp.float32).")


def check_training(training) -> bool:
  """``training`` as a Python bool, or a TypeError explaining why not."""
  if isinstance(training, (bool, np.bool_, type(None))):
    return bool(training)
  if isinstance(training, int) and training in (0, 1):
    return bool(training)
  if isinstance(training, jax.Array) and not isinstance(training,
                                                        jax.core.Tracer):
    if training.shape == () and training.dtype == jnp.bool_:
      return bool(training)
  raise TypeError(
      f"`training` must be a Python bool; got {type(training).__name__}. "
      "Under jax.jit mark it static (static_argnames=('training',)): "
      "training and inference are different programs.")


def check_mask(mask, shape):
  """The mask as 0/1 float32 weights of ``x``'s rank.

  True (or any nonzero number, NaN included) marks a valid element. A mask of
  lower rank is aligned with the leading axes, as Keras aligns a
  ``(batch, time)`` sequence mask with ``(batch, time, features)``.
  """
  if mask is None:
    return None
  shape, given = tuple(shape), type(mask).__name__
  if not hasattr(mask, "dtype"):
    mask = np.asarray(mask)
  if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)
          or np.issubdtype(mask.dtype, np.floating)):
    raise TypeError(
        f"`mask` must be boolean (or real numbers: nonzero is valid); got "
        f"{given} of dtype {mask.dtype}.")
  mask = jnp.asarray(mask)
  aligned = mask.shape + (1,) * (len(shape) - mask.ndim)
  if mask.ndim > len(shape) or any(m not in (1, s)
                                   for m, s in zip(aligned, shape)):
    raise ValueError(
        f"`mask` of shape {tuple(mask.shape)} does not align with the input "
        f"shape {shape}: a mask has the input's shape, or a prefix of it "
        "(e.g. (batch,) or (batch, time), aligned with the leading axes as in "
        "Keras), with 1 for any axis it does not vary over.")
  return (mask.reshape(aligned) != 0).astype(jnp.float32)


def check_trees(params, state):
  """``params`` and ``state`` as dicts of arrays, or a TypeError naming the
  argument and the fix."""
  checked = []
  for name, tree in (("params", params), ("state", state)):
    if not isinstance(tree, Mapping):
      raise TypeError(
          f"`{name}` must be a dict of arrays; got {type(tree).__name__}. "
          f"Create it with `params, state = jaxbn.init(config, x.shape)` (a "
          "layer without scale and center has params {}).")
    for key, value in tree.items():
      if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(
            f"`{name}['{key}']` must be an array; got "
            f"{type(value).__name__}. Convert it, e.g. `{name} = "
            f"{{k: jnp.asarray(v) for k, v in {name}.items()}}`.")
    checked.append(dict(tree))
  return tuple(checked)


def check_variables(config, resolved, params, state, input_shape):
  """A ValueError or TypeError unless ``params`` and ``state`` hold every
  entry ``config`` needs (:func:`state_names`), in the shape ``resolved``
  gives them and a dtype that keeps them moving."""
  expected = resolved.param_shape
  entries = state_names(config)
  missing = [k for k in entries[:2] if k not in state]
  if missing:
    raise ValueError(
        f"`state` has no {missing} (it has {sorted(state)}); create it with "
        "jaxbn.init(config, x.shape), or from a Flax layer's 'batch_stats'.")
  needed = [("params", "gamma", config.scale), ("params", "beta", config.center)]
  for kind, name, present in needed:
    if present and name not in params:
      raise ValueError(
          f"`{kind}` has no '{name}', but the config has "
          f"{'scale' if name == 'gamma' else 'center'}=True. Create params "
          "with jaxbn.init(config, x.shape).")
  statistics = tuple(n for n in entries if n not in COUNTER_NAMES)
  for kind, tree, names in (("params", params, ("gamma", "beta")),
                            ("state", state, statistics)):
    for name in (n for n in names if n in tree):
      _check_variable_dtype(kind, name, tree[name].dtype)
      if tuple(tree[name].shape) != tuple(expected):
        raise ValueError(
            f"'{name}' has shape {tuple(tree[name].shape)} but an input of "
            f"shape {tuple(input_shape)} with axis={config.axis!r} needs "
            f"{tuple(expected)} "
            f"(resolved channel axes {resolved.axes}). The input's channel "
            "count does not match the layer's variables: check `axis` and the "
            "input layout.")
  missing = [n for n in entries[2:] if n not in state]
  if missing:  # named after the argument that asks for the first of them
    asks = lambda n: _ASKED_FOR_BY.get(
        n, f"accumulation_steps={config.accumulation_steps}")
    group = [n for n in missing if asks(n) == asks(missing[0])]
    raise ValueError(
        f"{asks(missing[0])} needs state entries {group}; create the state "
        "with jaxbn.init using the same config.")


# The arguments that ask for state entries beyond the moving mean and
# variance (the accumulation's entries: accumulation_steps).
_ASKED_FOR_BY = {"moving_stddev": "renorm=True", "renorm_mean": "renorm=True",
                 "renorm_stddev": "renorm=True",
                 "renorm_step": "a scheduled `renorm_clipping` bound"}


def _check_variable_dtype(kind, name, dtype):
  """Parameters: any float dtype. Statistics: float32 or wider, since in a
  narrower float an EMA step below half an ulp of the average rounds away (a
  float16 moving mean at 1000 never moves by less than 0.25 per step), and
  an integer average never moves at all."""
  floating = jnp.issubdtype(dtype, jnp.floating)
  if kind == "params" and floating:
    return
  if floating and jnp.finfo(dtype).bits >= 32:
    return
  need = "a float dtype" if kind == "params" else "float32 (or float64)"
  raise TypeError(
      f"`{kind}['{name}']` has dtype {dtype}; it must be {need}"
      + ("" if kind == "params" else
         ": the moving averages stall in a narrower dtype, whatever the "
         "input's dtype (statistics are float32 for bfloat16/float16 input)")
      + f". Convert it, e.g. `{kind} = jax.tree.map(lambda v: "
      "v.astype(jnp.float32), " + kind + ")`.")


def check_virtual_batch(config, shape):
  vbs = config.virtual_batch_size
  if shape[0] % vbs:
    raise ValueError(
        f"The training batch size {shape[0]} is not a multiple of "
        f"`virtual_batch_size`={vbs}. Use a batch size divisible by {vbs}, or "
        "drop the remainder rows (inference accepts any batch size).")
