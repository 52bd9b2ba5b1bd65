"""Train the same BN network in tf_keras and in Flax + jaxbn; compare weights.

Three jaxbn layers use regularizers, constraints, Batch Renorm and ghost
batches. Keras adds the regularizers to ``model.losses`` and applies the
constraints inside its optimizer; jaxbn does both with two calls:
``jaxbn.model_regularization_loss`` in the loss and ``jaxbn.constrain`` chained
after ``optax.sgd``. After a few SGD steps every weight and moving statistic
agrees with Keras.

  pip install -e '.[examples,interop]'   # this example's extras
  python examples/keras_parity_training.py [--steps 5]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxbn  # noqa: E402

BN_ARGS = [
    dict(momentum=0.9, gamma_regularizer="l2", beta_regularizer="l1",
         gamma_constraint="min_max_norm",
         beta_constraint={"class_name": "MaxNorm",
                          "config": {"max_value": 0.05, "axis": 0}}),
    dict(momentum=0.8, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5},
         renorm_momentum=0.9, gamma_regularizer="l1_l2",
         gamma_constraint="non_neg"),
    dict(momentum=0.7, virtual_batch_size=8, beta_constraint="unit_norm",
         beta_regularizer={"class_name": "L2", "config": {"l2": 0.1}}),
]
WIDTHS = (32, 16, 10)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, training=False):
    for i, (width, bn_args) in enumerate(zip(WIDTHS, BN_ARGS)):
      x = nn.Dense(width, use_bias=False, name=f"dense_{i}")(x)
      x = jaxbn.BatchNormalization(**bn_args, name=f"bn_{i}")(
          x, training=training)
      if i < len(WIDTHS) - 1:
        x = nn.relu(x)
    return x


def keras_model(seed):
  import tensorflow as tf
  import tf_keras as keras
  tf.random.set_seed(seed)
  layers = [keras.Input((64,))]
  for i, (width, bn_args) in enumerate(zip(WIDTHS, BN_ARGS)):
    layers.append(keras.layers.Dense(width, use_bias=False,
                                      name=f"dense_{i}"))
    layers.append(keras.layers.BatchNormalization(**bn_args, name=f"bn_{i}"))
    if i < len(WIDTHS) - 1:
      layers.append(keras.layers.ReLU())
  return keras.Sequential(layers)


def _weights(model):
  return {w.name.split(":")[0]: w.numpy() for w in model.weights}


def train_keras(model, batches, lr):
  import tensorflow as tf
  import tf_keras as keras
  opt = keras.optimizers.SGD(lr)
  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  losses = []
  for x, y in batches:
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      loss = ce(y, logits) + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    losses.append(float(loss))
  return losses


def train_jaxbn(variables, batches, lr):
  model = Net()
  layers = jaxbn.collect_layers(model, variables, batches[0][0])
  tx = optax.chain(optax.sgd(lr), jaxbn.constrain(layers))
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": stats},
                                    x, training=True, mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + jaxbn.model_regularization_loss(layers, params), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates_p, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates_p), updates["batch_stats"],
            opt_state, loss)

  losses = []
  for x, y in batches:
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
    losses.append(float(loss))
  return {"params": params, "batch_stats": stats}, losses


def run(steps=5, batch_size=32, lr=0.5, seed=0):
  """Trains both; returns (max relative difference per variable, losses)."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  batches = [(x[i * batch_size:(i + 1) * batch_size],
              y[i * batch_size:(i + 1) * batch_size]) for i in range(steps)]
  kmodel = keras_model(seed)
  initial = _weights(kmodel)
  variables = jax.tree_util.tree_map(
      jnp.asarray, Net().init(jax.random.PRNGKey(seed), batches[0][0]))
  variables = jax.tree_util.tree_map(lambda v: v, variables)
  params = {k: dict(v) for k, v in variables["params"].items()}
  stats = {k: dict(v) for k, v in variables["batch_stats"].items()}
  for i in range(len(WIDTHS)):
    params[f"dense_{i}"] = {"kernel": initial[f"dense_{i}/kernel"]}
  k_losses = train_keras(kmodel, batches, lr)
  trained, j_losses = train_jaxbn({"params": params, "batch_stats": stats},
                                  batches, lr)
  final = _weights(kmodel)
  diffs = {}
  for name, value in final.items():
    layer, var = name.split("/")
    tree = trained["params"] if var in ("kernel", "gamma", "beta") \
        else trained["batch_stats"]
    ours = np.asarray(tree[layer][var]).ravel()
    # Relative to the variable's size (floored for all-zero variables).
    diffs[name] = float(np.max(np.abs(ours - value.ravel()))
                        / max(np.max(np.abs(value)), 1e-3))
  return diffs, k_losses, j_losses


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  diffs, k_losses, j_losses = run(steps=args.steps)
  print("step  keras loss  jaxbn loss")
  for i, (a, b) in enumerate(zip(k_losses, j_losses)):
    print(f"{i:4d}  {a:10.6f}  {b:10.6f}")
  print("max relative difference per variable after training:")
  for name, d in diffs.items():
    print(f"  {name:28s} {d:.2e}")
  worst = max(diffs.values())
  print(f"worst: {worst:.2e} ({'OK' if worst < 2e-4 else 'MISMATCH'})")


if __name__ == "__main__":
  main()
