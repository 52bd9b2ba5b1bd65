"""Batch Renorm on non-i.i.d. batches, Ghost BN on large batches (digits MLP).

Two situations these features exist for, each trained for several seeds
(every seed's numbers are printed, none is picked):

1. **Non-i.i.d. small batches**: every batch of 8 holds two classes, 4 images
   each (data read in class-sorted chunks, as from a sorted file or a
   per-class sampler). Plain BN normalizes with these skewed statistics in
   training but with the population's at inference, and the two disagree;
   Batch Renorm (``renorm=True``, r/d bounds ramped up as in its paper, the
   bounds callables of the step counter kept in state) corrects training
   toward the moving statistics. Reference: plain BN on i.i.d. batches of 8.
2. **Large i.i.d. batches**: plain BN over a batch of 256 vs Ghost BN
   (``virtual_batch_size=16``), the regularizer proposed for large-batch
   training. On a dataset this small the two may simply tie: the example
   reports what the seeds show.

Each setting ends with a one-line conclusion computed from the per-seed
test accuracies (inference mode, moving statistics); saves
``examples/ghost_renorm.png``. Each run is one compiled program: the seeds
under ``jax.vmap``, the steps under ``lax.scan``.

  pip install -e '.[examples]'   # this example's extras
  python examples/ghost_renorm_small_batches.py [--steps 1200] [--seeds 0 1 2 3 4]
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
from sklearn.model_selection import train_test_split  # noqa: E402

import jaxbn  # noqa: E402


def ramp(start, end, steps):
  """A bound growing linearly from ``start`` to ``end`` over ``steps``."""
  return lambda step: start + (end - start) * jnp.minimum(step / steps, 1.0)


def renorm(steps):
  """Batch Renorm as its paper trains it: r in [1/3, 3] and |d| <= 5, the
  upper bounds opened gradually over the first third of training."""
  return {"renorm": True, "renorm_momentum": 0.99,
          "renorm_clipping": {"rmax": ramp(1.0, 3.0, steps // 3),
                              "rmin": 1.0 / 3.0,
                              "dmax": ramp(0.0, 5.0, steps // 3)}}


class MLP(nn.Module):
  bn: dict

  @nn.compact
  def __call__(self, x, training: bool = False):
    for width in (64, 64):
      x = nn.Dense(width, use_bias=False)(x)
      x = jaxbn.BatchNormalization(momentum=0.99, **self.bn)(x, training)
      x = nn.relu(x)
    return nn.Dense(10)(x)


def batch_rows(labels, batch, classes_per_batch, rng, steps):
  """Row indices of ``steps`` batches: i.i.d. (``classes_per_batch=None``) or
  each batch made of ``classes_per_batch`` single-class chunks."""
  batches = []
  while len(batches) < steps:
    if classes_per_batch is None:
      order = rng.permutation(len(labels))
      batches += np.split(order[:len(order) // batch * batch],
                          len(order) // batch)
      continue
    chunk = batch // classes_per_batch
    chunks = []
    for c in np.unique(labels):
      rows = rng.permutation(np.flatnonzero(labels == c))
      chunks += np.split(rows[:len(rows) // chunk * chunk], len(rows) // chunk)
    rng.shuffle(chunks)
    batches += [np.concatenate(chunks[i:i + classes_per_batch])
                for i in range(0, len(chunks) - classes_per_batch + 1,
                               classes_per_batch)]
  return np.stack(batches[:steps])


def test_accuracies(bn, batch, classes_per_batch, seeds, steps):
  """Test accuracy after ``steps`` SGD steps, one per seed (a different
  split, initialization and batch order each)."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  model = MLP(bn=bn)
  optimizer = optax.sgd(0.02, momentum=0.9)
  runs = []
  for seed in seeds:
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=0.3, random_state=seed,
        stratify=digits.target)
    rows = batch_rows(y_tr, batch, classes_per_batch,
                      np.random.RandomState(seed), steps)
    variables = model.init(jax.random.key(seed), x_tr[:batch])
    runs.append((variables, x_tr, y_tr, x_te, y_te, rows))
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *runs)

  def train_one(variables, x_tr, y_tr, x_te, y_te, rows):
    def step(carry, batch_rows):
      params, batch_stats, opt_state = carry

      def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x_tr[batch_rows],
            training=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, y_tr[batch_rows]).mean(), updates["batch_stats"]
      grads, batch_stats = jax.grad(loss, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats,
              opt_state), None

    params = variables["params"]
    (params, batch_stats, _), _ = jax.lax.scan(
        step, (params, variables["batch_stats"], optimizer.init(params)),
        rows)
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         x_te)
    return jnp.mean(jnp.argmax(logits, -1) == y_te)

  return np.asarray(jax.jit(jax.vmap(train_one))(*stacked))


def compare(name, baseline, feature, seeds):
  """Prints each seed's pair and a conclusion the numbers support."""
  (base_label, base), (feature_label, ours) = baseline, feature
  for seed, b, f in zip(seeds, base, ours):
    print(f"  seed {seed}: {base_label} {b:.4f}   {feature_label} {f:.4f}")
  wins, losses = int(np.sum(ours > base)), int(np.sum(ours < base))
  gap = float(np.mean(ours - base))
  if wins == len(seeds):
    verdict = f"{feature_label} wins for every seed"
  elif losses == len(seeds):
    verdict = f"{feature_label} loses for every seed"
  else:
    verdict = "mixed"
  print(f"conclusion ({name}): {verdict}: ahead in {wins} of {len(seeds)} "
        f"seeds, behind in {losses}, mean difference {gap:+.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("ghost_renorm.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  steps, seeds = args.steps, args.seeds
  runs = {
      "plain BN, 2-class batches of 8": test_accuracies({}, 8, 2, seeds,
                                                        steps),
      "Batch Renorm, 2-class batches of 8": test_accuracies(
          renorm(steps), 8, 2, seeds, steps),
      "plain BN, i.i.d. batches of 8": test_accuracies({}, 8, None, seeds,
                                                       steps),
      "plain BN, batch 256": test_accuracies({}, 256, None, seeds, steps),
      "Ghost BN, batch 256, virtual 16": test_accuracies(
          {"virtual_batch_size": 16}, 256, None, seeds, steps),
  }
  labels = list(runs)
  print(f"1. non-i.i.d. batches of 8 (two classes, 4 images each), {steps} "
        "steps; test accuracy:")
  compare("non-i.i.d. batches", ("plain BN", runs[labels[0]]),
          ("Batch Renorm", runs[labels[1]]), seeds)
  print(f"  reference, plain BN on i.i.d. batches of 8: "
        f"{' '.join(f'{a:.4f}' for a in runs[labels[2]])}")
  print(f"2. i.i.d. batches of 256, {steps} steps; test accuracy:")
  compare("large batches", ("plain BN", runs[labels[3]]),
          ("Ghost BN", runs[labels[4]]), seeds)
  print("  (Ghost BN's gain is reported for long large-batch training of "
        "large networks; a 64-feature MLP on 1,257 digits reaches ~98% "
        "either way, so a tie here is the expected answer, not a failure)")

  plt.figure(figsize=(7, 3.6))
  for i, label in enumerate(labels):
    plt.scatter(np.full(len(seeds), i), runs[label], color=f"C{i}", s=18)
    plt.plot([i - 0.25, i + 0.25], [runs[label].mean()] * 2, color=f"C{i}")
  plt.xticks(range(len(labels)), [label.replace(", ", "\n", 1)
                                  for label in labels], fontsize=7)
  plt.ylabel("test accuracy (inference mode)")
  plt.title(f"{len(seeds)} seeds each (dots), mean (bar)")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
