"""Gradient accumulation with batch norm: ``accumulation_steps`` and
``optax.MultiSteps`` together reproduce the big-batch training step.

Three runs train the same network on scikit-learn's digits (offline) from the
same initialization, over the same batches of 64:

* **big batch**: one step per batch of 64, each batch norm with
  ``virtual_batch_size=16, virtual_batch_layout='contiguous'`` (every 16
  rows normalized with their own statistics: what 16-row micro-batches see);
* **accumulated**: micro-batches of 16, ``optax.MultiSteps(every_k=4)`` and
  ``accumulation_steps=4``: one optimizer step and one moving-average step
  per 4 calls;
* **naive**: the same micro-batches and ``optax.MultiSteps``, plain batch norm:
  its moving averages take 4 steps per optimizer step (4 times the decay),
  the problem gradient accumulation brings to every other batch norm.

It prints how far the accumulated and naive runs end from the big-batch run
(parameters, moving statistics, test accuracy) and a one-line conclusion.

  pip install -e '.[examples]'   # this example's extras
  python examples/gradient_accumulation.py [--epochs 3] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxbn

MICRO, K = 16, 4


class Net(nn.Module):
  bn: dict

  @nn.compact
  def __call__(self, x, training: bool = False):
    for features in (64, 32):
      x = nn.Dense(features, use_bias=False)(x)
      x = jaxbn.BatchNormalization(**self.bn)(x, training=training)
      x = nn.relu(x)
    return nn.Dense(10)(x)


RUNS = {
    "big batch": ({"virtual_batch_size": MICRO,
                   "virtual_batch_layout": "contiguous"}, 1),
    "accumulated": ({"accumulation_steps": K}, K),
    "naive": ({}, K),
}


def _setup(name):
  """The run's model, optimizer and jitted step (one per run, every seed)."""
  bn, calls = RUNS[name]
  model = Net(bn=dict(bn, momentum=0.9))
  optimizer = optax.sgd(0.1, momentum=0.9)
  if calls > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=calls)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, x, training=True,
          mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), updates["batch_stats"]
    grads, batch_stats = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  return model, optimizer, step, calls


SETUPS = {}


def train(name, data, epochs, seed):
  if name not in SETUPS:
    SETUPS[name] = _setup(name)
  model, optimizer, step, calls = SETUPS[name]
  x_train, x_test, y_train, y_test = data
  variables = model.init(jax.random.key(seed), x_train[:MICRO * K])
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = optimizer.init(params)
  order = np.random.default_rng(seed)
  batch = MICRO * K
  for _ in range(epochs):
    perm = order.permutation(len(x_train))
    for start in range(0, len(perm) - batch + 1, batch):
      rows = perm[start:start + batch]
      for part in np.split(rows, calls):  # the whole batch, or K micro-batches
        params, batch_stats, opt_state = step(
            params, batch_stats, opt_state, x_train[part], y_train[part])
  logits = model.apply({"params": params, "batch_stats": batch_stats}, x_test)
  accuracy = float((logits.argmax(-1) == y_test).mean())
  return params, batch_stats, accuracy


def _max_difference(a, b, names=None):
  leaves = lambda t: [v for path, v in jax.tree_util.tree_leaves_with_path(t)
                      if names is None or str(path[-1].key) in names]
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(leaves(a),
                                                             leaves(b)))


def main(epochs=3, seed=0):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  data = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                          stratify=digits.target)
  results = {name: train(name, data, epochs, seed) for name in RUNS}
  reference_params, reference_stats, _ = results["big batch"]
  moving = ("moving_mean", "moving_variance")
  gaps = {}
  for name, (params, stats, accuracy) in results.items():
    gaps[name] = (_max_difference(params, reference_params),
                  _max_difference(stats, reference_stats, moving))
    print(f"{name:>12}: test accuracy {accuracy:.4f}; max |difference| from "
          f"the big batch: parameters {gaps[name][0]:.1e}, moving statistics "
          f"{gaps[name][1]:.1e}")
  (param_gap, stat_gap), naive_gap = gaps["accumulated"], gaps["naive"][1]
  print(f"conclusion (seed {seed}): accumulation_steps={K} reproduces the "
        f"big-batch training (parameters within {param_gap:.0e}, moving "
        f"statistics within {stat_gap:.0e}: float32 rounding); updating them "
        f"on every micro-batch ends {naive_gap:.2f} away")
  print("note: the naive averages decay as with momentum 0.9^4 = 0.66, a "
        "different estimator (on a short run its accuracy may even be "
        "higher); only accumulation_steps gives the big batch's")
  return gaps


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  args = parser.parse_args()
  for seed in args.seeds:
    main(args.epochs, seed)
