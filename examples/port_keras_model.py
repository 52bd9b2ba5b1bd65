"""Port a trained tf_keras CNN with BatchNormalization to Flax + jaxbn.

Trains a small Keras model on digits for one epoch (so the moving statistics
are real), converts every BN layer with ``jaxbn.keras_model_variables``,
copies the Conv/Dense kernels, and compares the two models' outputs in
inference and in training mode. Saves a scatter plot of Keras vs jaxbn
logits to ``examples/port_keras.png``.

  pip install -e '.[examples,interop]'   # this example's extras
  python examples/port_keras_model.py
"""
from __future__ import annotations

import argparse
import pathlib
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxbn  # noqa: E402


class FlaxNet(nn.Module):
  """The Keras model, layer for layer, with Keras' layer names."""

  @nn.compact
  def __call__(self, x, training=False):
    x = nn.Conv(8, (3, 3), padding="VALID", use_bias=False, name="conv")(x)
    x = jaxbn.BatchNormalization(momentum=0.9, name="bn_conv")(x, training)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(32, name="dense")(x)
    x = jaxbn.BatchNormalization(momentum=0.9, renorm=True,
                                 renorm_clipping={"rmax": 3.0, "dmax": 5.0},
                                 name="bn_dense")(x, training)
    return nn.Dense(10, name="logits")(nn.relu(x))


def keras_net():
  import tf_keras as keras
  return keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(8, 3, use_bias=False, name="conv"),
      keras.layers.BatchNormalization(momentum=0.9, name="bn_conv"),
      keras.layers.ReLU(),
      keras.layers.Flatten(),
      keras.layers.Dense(32, name="dense"),
      keras.layers.BatchNormalization(momentum=0.9, renorm=True,
                                      renorm_clipping={"rmax": 3.0,
                                                       "dmax": 5.0},
                                      name="bn_dense"),
      keras.layers.ReLU(),
      keras.layers.Dense(10, name="logits"),
  ])


def port(kmodel):
  """Flax variables for FlaxNet from the Keras model."""
  variables = jaxbn.keras_model_variables(kmodel)
  for name in ("conv", "dense", "logits"):
    weights = kmodel.get_layer(name).get_weights()
    variables["params"][name] = {"kernel": weights[0]}
    if len(weights) > 1:
      variables["params"][name]["bias"] = weights[1]
  return jax.tree_util.tree_map(np.asarray, variables)


def run(batch_size=64, seed=0):
  import tensorflow as tf
  tf.random.set_seed(seed)
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target
  kmodel = keras_net()
  kmodel.compile("adam", "sparse_categorical_crossentropy")
  for i in tqdm(range(0, len(x) - batch_size, batch_size), desc="keras",
                leave=False):
    kmodel.train_on_batch(x[i:i + batch_size], y[i:i + batch_size])
  variables = port(kmodel)
  flax_model = FlaxNet()
  batch = x[:256]
  k_infer = kmodel(batch, training=False).numpy()
  j_infer = np.asarray(flax_model.apply(variables, batch))
  k_train = kmodel(batch, training=True).numpy()
  j_train, _ = flax_model.apply(variables, batch, training=True,
                                mutable=["batch_stats"])
  return k_infer, j_infer, k_train, np.asarray(j_train)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("port_keras.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  k_infer, j_infer, k_train, j_train = run()
  for mode, k, j in (("inference", k_infer, j_infer),
                     ("training", k_train, j_train)):
    print(f"{mode:9s} max |keras - jaxbn| = {np.max(np.abs(k - j)):.2e} "
          f"(logits up to {np.max(np.abs(k)):.1f})")
  plt.figure(figsize=(4, 4))
  plt.scatter(k_infer.ravel(), j_infer.ravel(), s=3)
  plt.xlabel("tf_keras logits")
  plt.ylabel("Flax + jaxbn logits")
  plt.title("ported model, inference mode")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
