"""Keras 3 (JAX backend) with the arguments Keras 3 dropped: a small CNN on
scikit-learn's digits with ``jaxbn.keras.BatchNormalization(
virtual_batch_size=..., renorm=True)``, trained with ``model.fit``, saved to a
``.keras`` file and loaded back with the same predictions.

  pip install -e '.[examples,interop]'   # this example's extras
  python examples/keras3_ghost_renorm.py [--epochs 3] [--out model.keras]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import jaxbn.keras  # noqa: E402


def main(epochs=3, out=None, seed=0):
  keras.utils.set_random_seed(seed)
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target, test_size=0.25, random_state=seed,
      stratify=digits.target)
  model = keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
      # Ghost batch norm (virtual batches of 8) with Batch Renormalization:
      # tf.keras 2.x arguments, gone from Keras 3's own layer
      jaxbn.keras.BatchNormalization(virtual_batch_size=8, renorm=True,
                                     renorm_clipping={"rmax": 3.0,
                                                      "rmin": 1 / 3.0,
                                                      "dmax": 5.0}),
      keras.layers.ReLU(),
      keras.layers.Flatten(),
      keras.layers.Dense(10),
  ])
  model.compile(optimizer=keras.optimizers.Adam(3e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
  whole = len(x_train) // 64 * 64  # virtual batches need whole batches
  model.fit(x_train[:whole], y_train[:whole], batch_size=64, epochs=epochs,
            verbose=2)
  _, accuracy = model.evaluate(x_test, y_test, verbose=0)
  path = out or os.path.join(tempfile.mkdtemp(), "model.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  same = np.array_equal(loaded.predict(x_test, verbose=0),
                        model.predict(x_test, verbose=0))
  print(f"test accuracy {accuracy:.4f}; saved to {path} and loaded back, "
        f"identical predictions: {same}")
  return accuracy, same


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  main(args.epochs, args.out)
