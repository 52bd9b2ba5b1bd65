"""Demo: a small convolutional network with jaxbn layers on scikit-learn's digits.

Runs offline (the data ships with scikit-learn), trains with optax, prints the
loss and test accuracy, and saves the training curve to ``digits_curve.png``.

  pip install -e '.[examples]'   # this example's extras
  python examples/train_digits.py [--epochs 15] [--out examples/digits_curve.png]
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


class DigitsNet(nn.Module):
  """conv-BN-relu x2, dense-BN-relu, dense; Keras' BN defaults."""

  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, training: bool = False):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = jaxbn.BatchNormalization(momentum=self.momentum)(x,
                                                           training=training)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(64, use_bias=False)(x)
    x = jaxbn.BatchNormalization(momentum=self.momentum)(x, training=training)
    x = nn.relu(x)
    return nn.Dense(10)(x)


def load_data(seed=0):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1)
  return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                          stratify=digits.target)


def train(epochs=15, batch_size=64, learning_rate=3e-3, seed=0,
          progress=True):
  x_train, x_test, y_train, y_test = load_data(seed)
  model = DigitsNet()
  variables = model.init(jax.random.PRNGKey(seed), x_train[:batch_size])
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, x, training=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @jax.jit
  def accuracy(params, batch_stats, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  rng = np.random.RandomState(seed)
  steps_per_epoch = len(x_train) // batch_size
  history = {"loss": [], "test_accuracy": []}
  bar = tqdm(range(epochs), desc="epochs", disable=not progress)
  for _ in bar:
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, batch_stats, opt_state, loss = train_step(
          params, batch_stats, opt_state, x_train[idx], y_train[idx])
      losses.append(float(loss))
    acc = float(accuracy(params, batch_stats, x_test, y_test))
    history["loss"].append(float(np.mean(losses)))
    history["test_accuracy"].append(acc)
    bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", test_acc=f"{acc:.3f}")
  return history


def plot(history, path):
  fig, ax1 = plt.subplots(figsize=(6, 3.5))
  epochs = np.arange(1, len(history["loss"]) + 1)
  loss_line, = ax1.plot(epochs, history["loss"], "o-", color="tab:blue",
                        label="training loss")
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("training loss (cross-entropy)")
  ax1.set_ylim(bottom=0)
  ax2 = ax1.twinx()
  accuracy_line, = ax2.plot(epochs, history["test_accuracy"], "s-",
                            color="tab:orange", label="test accuracy")
  ax2.set_ylabel("test accuracy")
  ax2.set_ylim(0, 1)  # the whole scale: 0.97 should look like 0.97
  ax1.legend(handles=[loss_line, accuracy_line], loc="center right")
  ax1.set_title("digits: conv net with jaxbn.BatchNormalization")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("digits_curve.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  start = time.time()
  history = train(epochs=args.epochs)
  plot(history, args.out)
  print(f"first epoch loss {history['loss'][0]:.4f} -> last "
        f"{history['loss'][-1]:.4f}")
  print(f"test accuracy {history['test_accuracy'][-1]:.4f}")
  print(f"saved {args.out} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
  main()
