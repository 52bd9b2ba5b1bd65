"""Fine-tuning with frozen BN (``trainable=False``) vs BN left in training mode.

The situation frozen BN exists for: a network pretrained on plenty of data is
fine-tuned on a small set from a shifted domain (here: digits with pixel
noise, 100 images) in batches so small that their statistics are mostly
noise — 2 images per step, as detection and segmentation models are
fine-tuned per device. With BN in training mode, every step normalizes with
the statistics of 2 images and the moving statistics drift toward them; with
``trainable=False`` (Keras' TF2 rule) BN runs in inference mode: it
normalizes with the pretrained moving statistics, which stay as they were.

For each seed (a different split, initialization and order) it pretrains on
half of the training split, fine-tunes both ways from the same weights, and
prints the shifted test set's accuracy. The same is then repeated with
batches of 8, where batch statistics are informative and training-mode BN
also adapts its statistics to the new domain: the example reports what the
seeds show there too. A conclusion line per setting is computed from the
numbers; saves ``examples/finetune.png``.

  pip install -e '.[examples]'   # this example's extras
  python examples/finetune_frozen_bn.py [--epochs 5] [--seeds 0 1 2 3 4]
"""
from __future__ import annotations

import argparse
import functools
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
from sklearn.model_selection import train_test_split  # noqa: E402

import jaxbn  # noqa: E402

TUNE_SET, NOISE = 100, 0.15


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


@functools.lru_cache(maxsize=None)
def trainer(bn_trainable: bool, learning_rate: float):
  """The model, its optimizer and its jitted step (built once, every seed)."""
  model = MLP(bn_trainable=bn_trainable)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x,
          training=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), updates["batch_stats"]
    grads, batch_stats = jax.grad(loss, has_aux=True)(variables["params"])
    updates, opt_state = optimizer.update(grads, opt_state,
                                          variables["params"])
    return {"params": optax.apply_updates(variables["params"], updates),
            "batch_stats": batch_stats}, opt_state

  return model, optimizer, step


def fit(trainable, learning_rate, variables, data, epochs, batch_size, seed):
  model, optimizer, step = trainer(trainable, learning_rate)
  x, y = data
  opt_state = optimizer.init(variables["params"])
  rng = np.random.RandomState(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for rows in np.split(order[:len(x) // batch_size * batch_size],
                         len(x) // batch_size):
      variables, opt_state = step(variables, opt_state, x[rows], y[rows])
  return model, variables


def accuracy(model, variables, x, y):
  return float(jnp.mean(jnp.argmax(model.apply(variables, x), -1) == y))


def moving_mean_drift(before, after):
  return max(float(jnp.max(jnp.abs(after["batch_stats"][k]["moving_mean"]
                                   - before["batch_stats"][k]["moving_mean"])))
             for k in before["batch_stats"])


def run(seed, batch_size, epochs):
  """Shifted-domain test accuracy: pretrained, frozen BN, BN training."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.3,
                                            random_state=seed,
                                            stratify=digits.target)
  rng = np.random.RandomState(seed)
  order = rng.permutation(len(x_tr))
  source, target = order[:len(order) // 2], order[len(order) // 2:][:TUNE_SET]
  shift = lambda a: a + NOISE * rng.randn(*a.shape).astype(np.float32)
  tune = (shift(x_tr[target]), y_tr[target])
  test = (shift(x_te), y_te)
  pretrained_model = MLP()
  _, pretrained = fit(True, 3e-3,
                      pretrained_model.init(jax.random.key(seed), x[:8]),
                      (x_tr[source], y_tr[source]), 10, 32, seed)
  result = {"pretrained": accuracy(pretrained_model, pretrained, *test)}
  for label, trainable in (("frozen BN", False), ("BN training", True)):
    model, tuned = fit(trainable, 1e-3, pretrained, tune, epochs, batch_size,
                       seed)
    result[label] = accuracy(model, tuned, *test)
    result[f"{label} drift"] = moving_mean_drift(pretrained, tuned)
  return result


def report(batch_size, epochs, seeds):
  print(f"fine-tuning on {TUNE_SET} noisy images, batches of {batch_size}, "
        f"{epochs} epochs; accuracy on the noisy test set:")
  results = [run(seed, batch_size, epochs) for seed in seeds]
  for seed, r in zip(seeds, results):
    print(f"  seed {seed}: pretrained {r['pretrained']:.4f}   frozen BN "
          f"{r['frozen BN']:.4f} (moving_mean drift "
          f"{r['frozen BN drift']:.2f})   BN training {r['BN training']:.4f} "
          f"(drift {r['BN training drift']:.2f})")
  frozen = np.array([r["frozen BN"] for r in results])
  training = np.array([r["BN training"] for r in results])
  pretrained = np.array([r["pretrained"] for r in results])
  wins, losses = int(np.sum(frozen > training)), int(np.sum(frozen < training))
  if wins == len(seeds):
    verdict = "frozen BN wins for every seed"
  elif losses == len(seeds):
    verdict = "BN training wins for every seed"
  else:
    verdict = "mixed"
  print(f"conclusion (batches of {batch_size}): {verdict}: ahead in {wins} of "
        f"{len(seeds)} seeds, behind in {losses}, mean difference "
        f"{np.mean(frozen - training):+.4f}; BN training ends below the "
        f"pretrained network in {int(np.sum(training < pretrained))} of "
        f"{len(seeds)} seeds, frozen BN in "
        f"{int(np.sum(frozen < pretrained))}")
  return verdict, frozen, training


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("finetune.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  _, *tiny = report(2, args.epochs, args.seeds)
  verdict, *informative = report(8, args.epochs, args.seeds)
  if not verdict.startswith("frozen"):
    print("  (with batches of 8 the batch statistics carry information, and "
          "training-mode BN re-estimates them on the new domain: freezing BN "
          "is the choice for tiny batches, not a rule)")
  print(f"  ({TUNE_SET} images barely move a network pretrained on half the "
        "training split: what differs is how much BN training takes away)")

  plt.figure(figsize=(5, 3.2))
  for i, (label, accs) in enumerate((("frozen BN", (tiny[0], informative[0])),
                                     ("BN training",
                                      (tiny[1], informative[1])))):
    for j, acc in enumerate(accs):
      plt.scatter(np.full(len(acc), j + (i - 0.5) * 0.3), acc, color=f"C{i}",
                  s=18, label=label if j == 0 else None)
  plt.xticks([0, 1], ["batches of 2", "batches of 8"])
  plt.ylabel("accuracy, shifted test set")
  plt.legend(fontsize=8)
  plt.title(f"fine-tuning {TUNE_SET} images, {len(args.seeds)} seeds")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
