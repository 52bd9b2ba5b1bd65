"""A plain NumPy float64 batch norm, written from the formulas, for the tests."""
import numpy as np


def batch_norm_train(x, gamma, beta, state, *, axes, momentum, epsilon,
                     mask=None, virtual_batch_size=None, renorm=False,
                     rmin=None, rmax=None, dmax=None, renorm_momentum=0.99,
                     bessel=False):
  """Returns (y, new_state); ``axes`` are the channel axes (non-negative)."""
  x = np.asarray(x, np.float64)
  ndim = x.ndim
  red = tuple(i for i in range(ndim) if i not in axes)
  bshape = tuple(x.shape[i] if i in axes else 1 for i in range(ndim))
  g = np.ones(bshape) if gamma is None else np.reshape(gamma, bshape)
  b = np.zeros(bshape) if beta is None else np.reshape(beta, bshape)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(
      np.asarray(mask, np.float64), x.shape)
  if virtual_batch_size is None:
    groups = [np.arange(x.shape[0])]
  else:
    n_groups = x.shape[0] // virtual_batch_size
    groups = [np.arange(gi, x.shape[0], n_groups) for gi in range(n_groups)]
  y = np.empty_like(x)
  means, variances, counts = [], [], []
  for rows in groups:
    xg, wg = x[rows], w[rows]
    n = wg.sum(axis=red, keepdims=True)
    mean = (wg * xg).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    var = (wg * (xg - mean) ** 2).sum(axis=red, keepdims=True) / np.maximum(
        n, 1)
    means.append(mean)
    variances.append(var)
    counts.append(n)
  counts_a = np.stack(counts)
  batch_mean = (counts_a * np.stack(means)).sum(0) / counts_a.sum(0)
  corrected = [v * (n / np.maximum(n - 1, 1) if bessel else 1)
               for v, n in zip(variances, counts)]
  batch_var = (counts_a * np.stack(corrected)).sum(0) / counts_a.sum(0)
  new = {k: np.asarray(v, np.float64).copy() for k, v in state.items()}
  shape = np.shape(state["moving_mean"])
  r, d = np.ones(bshape), np.zeros(bshape)
  if renorm:
    std = np.sqrt(batch_var + epsilon)
    sigma = np.maximum(np.reshape(state["renorm_stddev"], bshape),
                       np.sqrt(epsilon))
    r = std / sigma
    d = (batch_mean - np.reshape(state["renorm_mean"], bshape)) / sigma
    if rmin is not None:
      r = np.maximum(r, rmin)
    if rmax is not None:
      r = np.minimum(r, rmax)
    if dmax is not None:
      d = np.clip(d, -dmax, dmax)
    ema = lambda a, v, m: m * a + (1 - m) * np.reshape(v, shape)
    new["renorm_mean"] = ema(state["renorm_mean"], batch_mean, renorm_momentum)
    new["renorm_stddev"] = ema(state["renorm_stddev"], std, renorm_momentum)
    new["moving_stddev"] = ema(state["moving_stddev"], std, momentum)
    new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - epsilon, 0)
    new["moving_mean"] = ema(state["moving_mean"], batch_mean, momentum)
  else:
    new["moving_mean"] = momentum * new["moving_mean"] + (
        1 - momentum) * np.reshape(batch_mean, shape)
    new["moving_variance"] = momentum * new["moving_variance"] + (
        1 - momentum) * np.reshape(batch_var, shape)
  for rows, mean, var in zip(groups, means, variances):
    x_hat = (x[rows] - mean) / np.sqrt(var + epsilon)
    y[rows] = (x_hat * r + d) * g + b
  return y, new


def batch_norm_inference(x, gamma, beta, state, *, axes, epsilon):
  x = np.asarray(x, np.float64)
  bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
  g = np.ones(bshape) if gamma is None else np.reshape(gamma, bshape)
  b = np.zeros(bshape) if beta is None else np.reshape(beta, bshape)
  mean = np.reshape(state["moving_mean"], bshape)
  var = np.reshape(state["moving_variance"], bshape)
  return (x - mean) / np.sqrt(var + epsilon) * g + b
