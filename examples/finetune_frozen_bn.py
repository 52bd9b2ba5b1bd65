"""Fine-tuning with frozen BN (``trainable=False``) vs BN left in training mode.

Pretrains a digits MLP on classes 0-4, then fine-tunes it on a small set of
classes 5-9 (batches of 8) twice: once with its BN layers built with
``trainable=False`` (Keras' TF2 rule: a frozen BN runs in inference mode, so
its moving statistics stay those of the large pretraining set and it
normalizes with them), once with BN still training. Prints the accuracy of
both on the new classes and how far the moving statistics moved; saves
``examples/finetune.png``.

  pip install -e '.[examples]'   # this example's extras
  python examples/finetune_frozen_bn.py [--epochs 10]
"""
from __future__ import annotations

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxbn  # noqa: E402


class MLP(nn.Module):
  bn_trainable: bool = True

  @nn.compact
  def __call__(self, x, training=False):
    for width in (64, 64):
      x = nn.Dense(width, use_bias=False)(x)
      x = jaxbn.BatchNormalization(momentum=0.9,
                                   trainable=self.bn_trainable)(x, training)
      x = nn.relu(x)
    return nn.Dense(10)(x)


def fit(model, variables, x, y, epochs, batch_size, lr, seed, label):
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, xb, yb):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": stats}, xb,
                                training=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return loss.mean(), upd["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  rng = np.random.RandomState(seed)
  for _ in tqdm(range(epochs), desc=label, leave=False):
    order = rng.permutation(len(x))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      params, stats, opt_state = step(params, stats, opt_state, x[idx],
                                      y[idx])
  return {"params": params, "batch_stats": stats}


def accuracy(model, variables, x, y):
  logits = model.apply(variables, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def run(epochs=10, seed=0):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target
  old, new = y < 5, y >= 5
  rng = np.random.RandomState(seed)
  new_idx = rng.permutation(np.flatnonzero(new))
  tune_idx, test_idx = new_idx[:120], new_idx[120:]
  base = MLP()
  variables = base.init(jax.random.PRNGKey(seed), x[:8])
  variables = fit(base, variables, x[old], y[old], 10, 32, 3e-3, seed,
                  "pretrain 0-4")
  results = {}
  for label, trainable in (("frozen BN (trainable=False)", False),
                           ("BN in training mode", True)):
    model = MLP(bn_trainable=trainable)
    tuned = fit(model, variables, x[tune_idx], y[tune_idx], epochs, 8, 1e-3,
                seed, label)
    drift = max(float(jnp.max(jnp.abs(
        tuned["batch_stats"][k]["moving_mean"]
        - variables["batch_stats"][k]["moving_mean"])))
                for k in variables["batch_stats"])
    results[label] = {
        "new classes": accuracy(model, tuned, x[test_idx], y[test_idx]),
        "old classes": accuracy(model, tuned, x[old], y[old]),
        "moving_mean drift": drift}
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("finetune.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  results = run(args.epochs)
  for label, r in results.items():
    print(f"{label:28s} new-class accuracy {r['new classes']:.3f}  "
          f"old-class accuracy {r['old classes']:.3f}  "
          f"moving_mean drift {r['moving_mean drift']:.3f}")
  labels = list(results)
  pos = np.arange(2)
  plt.figure(figsize=(5, 3.2))
  for i, label in enumerate(labels):
    plt.bar(pos + (i - 0.5) * 0.35,
            [results[label]["new classes"], results[label]["old classes"]],
            0.35, label=label)
  plt.xticks(pos, ["new classes (5-9)", "old classes (0-4)"])
  plt.ylabel("accuracy")
  plt.legend(fontsize=8)
  plt.title("fine-tuning 120 examples, batches of 8")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
