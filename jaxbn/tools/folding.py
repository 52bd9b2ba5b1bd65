"""Fold an inference-mode batch norm into the preceding Dense or Conv.

After a linear layer ``z = x @ W + b`` (or a convolution), inference-mode
batch norm is a per-channel affine map ``y = (z - mu) * a + beta`` with
``a = gamma / sqrt(var + epsilon)``. Scaling the kernel's output channels by
``a`` and setting the bias to ``(b - mu) * a + beta`` gives the same ``y`` with
one layer less::

  W' = W * a   (along the kernel's output-channel axis)
  b' = (b - mu) * a + beta
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from jax import lax

from jaxbn.config import BatchNormConfig


def fold_into_kernel(kernel, bias, config: BatchNormConfig | Any,
                     params: Mapping[str, Any], state: Mapping[str, Any], *,
                     kernel_out_axis: int = -1):
  """Returns ``(kernel', bias')`` equal to kernel/bias followed by the BN.

  Args:
    kernel: the Dense/Conv kernel; ``kernel_out_axis`` is its output-channel
      axis (-1 for Flax's Dense and NHWC Conv kernels, 0 for OIHW).
    bias: the layer's bias, or None (a layer without bias).
    config: the BN's ``BatchNormConfig`` or a jaxbn layer; its channel axis
      must be the layer's output-channel axis (single axis).
    params: the BN's ``{'gamma', 'beta'}``, or a Linen ``{'params': ...,
      'batch_stats': ...}`` dict (then ``state`` may be None).
    state: the BN's moving statistics.
  """
  config = getattr(config, "config", config)
  if config.activation is not None:
    raise ValueError(
        f"The BN has activation={config.activation!r}, which no kernel and "
        "bias can fold: fold its affine part by passing "
        "dataclasses.replace(config, activation=None) (or "
        "module.clone(activation=None)) and apply the ReLU after the folded "
        "layer.")
  if "params" in params and "batch_stats" in params:
    params, state = params["params"], params["batch_stats"]
  mean = jnp.ravel(state["moving_mean"])
  variance = jnp.ravel(state["moving_variance"])
  channels = kernel.shape[kernel_out_axis]
  if mean.shape[0] != channels:
    raise ValueError(
        f"The BN has {mean.shape[0]} channels but the kernel has {channels} "
        f"output channels along kernel_out_axis={kernel_out_axis}; fold only "
        "a BN over the layer's output-channel axis.")
  a = lax.rsqrt(variance + config.epsilon)
  if config.scale:
    a = a * jnp.ravel(params["gamma"])
  shape = [1] * kernel.ndim
  shape[kernel_out_axis] = channels
  new_kernel = kernel * a.reshape(shape).astype(kernel.dtype)
  bias = jnp.zeros((channels,), kernel.dtype) if bias is None else bias
  new_bias = (bias - mean) * a
  if config.center:
    new_bias = new_bias + jnp.ravel(params["beta"])
  return new_kernel, new_bias.astype(kernel.dtype)
