"""Plain BN vs Ghost BN vs Batch Renorm at small batch sizes (digits CNN).

Small batches make batch statistics noisy and make training-mode outputs
differ from inference-mode ones. Three variants of one small conv net:

* plain BN, batch 4: statistics of 4 images per step;
* Ghost BN, batch 32 split into virtual batches of 4 (``virtual_batch_size``):
  the same statistics size, eight times more data per step;
* Batch Renorm, batch 4, with r/d bounds ramped up over training (callable
  ``renorm_clipping`` bounds of the step counter kept in state).

Prints the test accuracy (inference mode) of each and saves
``examples/ghost_renorm.png``.

  pip install -e '.[examples]'   # this example's extras
  python examples/ghost_renorm_small_batches.py [--epochs 8]
"""
from __future__ import annotations

import argparse
import pathlib
import time

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
from tqdm import tqdm  # noqa: E402

import jaxbn  # noqa: E402


def ramp(start, end, steps):
  """A bound growing linearly from ``start`` to ``end`` over ``steps``."""
  return lambda step: start + (end - start) * jnp.minimum(step / steps, 1.0)


VARIANTS = {
    "plain BN (batch 4)": (4, {}),
    "Ghost BN (batch 32, virtual 4)": (32, {"virtual_batch_size": 4}),
    "Batch Renorm (batch 4)": (4, {"renorm": True, "renorm_momentum": 0.9,
                                   "renorm_clipping": {
                                       "rmax": ramp(1.0, 3.0, 500),
                                       "rmin": 1.0 / 3.0,
                                       "dmax": ramp(0.0, 5.0, 500)}}),
}


class Net(nn.Module):
  bn: dict

  @nn.compact
  def __call__(self, x, training=False):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = jaxbn.BatchNormalization(momentum=0.9, **self.bn)(x, training)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(x)


def train(batch_size, bn_args, epochs, seed=0, label=""):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.3,
                                            random_state=seed)
  model = Net(bn=bn_args)
  variables = model.init(jax.random.PRNGKey(seed), x_tr[:batch_size])
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": stats}, x,
                                training=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  @jax.jit
  def accuracy(params, stats):
    logits = model.apply({"params": params, "batch_stats": stats}, x_te)
    return jnp.mean(jnp.argmax(logits, -1) == y_te)

  rng = np.random.RandomState(seed)
  images_seen, curve = 0, []
  examples_per_epoch = len(x_tr) // batch_size * batch_size
  for _ in tqdm(range(epochs), desc=label, leave=False):
    order = rng.permutation(len(x_tr))[:examples_per_epoch]
    for idx in order.reshape(-1, batch_size):
      params, stats, opt_state = step(params, stats, opt_state, x_tr[idx],
                                      y_tr[idx])
    images_seen += examples_per_epoch
    curve.append((images_seen, float(accuracy(params, stats))))
  return curve


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("ghost_renorm.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  start = time.time()
  curves = {}
  for label, (batch_size, bn_args) in VARIANTS.items():
    curves[label] = train(batch_size, bn_args, args.epochs, label=label)
    print(f"{label:32s} test accuracy {curves[label][-1][1]:.4f}")
  plt.figure(figsize=(6, 3.6))
  for label, curve in curves.items():
    seen, acc = zip(*curve)
    plt.plot(seen, acc, "o-", label=label)
  plt.xlabel("training images seen")
  plt.ylabel("test accuracy (inference mode)")
  plt.legend(fontsize=8)
  plt.title("small batches: plain vs ghost vs renorm")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
  main()
