"""An Equinox CNN with jaxbn batch norms, trained on scikit-learn's digits.

Equinox's idioms throughout: the model is an ``eqx.Module``, the moving
statistics live in ``eqx.nn.State`` (``eqx.nn.make_with_state``), examples go
through the model one at a time under ``jax.vmap(..., axis_name='batch')``
and the batch norms take their statistics over that axis
(``per_example=True``), and ``eqx.nn.inference_mode`` switches to inference.
Runs offline; prints the test accuracy in inference mode.

  pip install -e '.[examples,equinox]'   # this example's extras
  python examples/equinox_cnn.py [--epochs 8] [--seed 0]
"""
from __future__ import annotations

import argparse

import equinox as eqx
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from jaxbn.equinox import BatchNormalization


class CNN(eqx.Module):
  """conv-BN-relu x2, dense; examples are (1, 8, 8), channels first."""

  convs: list
  norms: list
  head: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, 3)
    self.convs = [eqx.nn.Conv2d(1, 16, 3, padding=1, use_bias=False,
                                key=keys[0]),
                  eqx.nn.Conv2d(16, 32, 3, padding=1, use_bias=False,
                                key=keys[1])]
    # Keras' arguments, Equinox's per-example style
    self.norms = [BatchNormalization(c, axis=0, axis_name="batch",
                                     per_example=True, momentum=0.9)
                  for c in (16, 32)]
    self.head = eqx.nn.Linear(32 * 8 * 8, 10, key=keys[2])

  def __call__(self, x, state):
    for conv, norm in zip(self.convs, self.norms):
      x, state = norm(conv(x), state)
      x = jax.nn.relu(x)
    return self.head(x.reshape(-1)), state


def main(epochs=8, seed=0, batch_size=64):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target, test_size=0.25, random_state=seed,
      stratify=digits.target)
  model, state = eqx.nn.make_with_state(CNN)(jax.random.key(seed))
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

  @eqx.filter_jit
  def step(model, state, opt_state, x, y):
    def loss(model, state):
      logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                               out_axes=(0, None))(x, state)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), state
    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
        model, state)
    updates, opt_state = optimizer.update(grads, opt_state,
                                          eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, opt_state, value

  order = np.random.default_rng(seed)
  for epoch in range(epochs):
    perm = order.permutation(len(x_train))
    for start in range(0, len(perm) - batch_size + 1, batch_size):
      rows = perm[start:start + batch_size]
      model, state, opt_state, value = step(model, state, opt_state,
                                            x_train[rows], y_train[rows])
    print(f"epoch {epoch + 1}: loss {float(value):.4f}")
  frozen = eqx.nn.inference_mode(model)
  logits, _ = jax.vmap(frozen, axis_name="batch", in_axes=(0, None),
                       out_axes=(0, None))(x_test, state)
  accuracy = float((logits.argmax(-1) == y_test).mean())
  print(f"test accuracy (inference mode, moving statistics) {accuracy:.4f}")
  return accuracy


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  main(args.epochs, args.seed)
