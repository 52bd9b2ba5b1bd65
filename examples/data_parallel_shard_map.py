"""Data-parallel training with shard_map on 8 simulated devices: synced vs local BN.

Each device sees a small shard (8 digits images). With ``axis_name='data'`` the
jaxbn layers compute statistics over the whole global batch (one all-reduce per
layer, exact with masks and uneven shards); without it each device normalizes
with its own 8 examples (noisier statistics, as ``pmap`` without
``axis_name``). A mask drops padding rows of the last, partial batch.
Prints the test accuracy of both and saves ``examples/sync_vs_local.png``.

  pip install -e '.[examples]'   # this example's extras
  python examples/data_parallel_shard_map.py [--epochs 8]
"""
from __future__ import annotations

import argparse
import pathlib
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxbn  # noqa: E402

PER_DEVICE = 8


class Net(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, training=False, mask=None):
    for width in (64, 32):
      x = nn.Dense(width, use_bias=False)(x)
      x = jaxbn.BatchNormalization(momentum=0.9, axis_name=self.axis_name)(
          x, training=training, mask=mask)
      x = nn.relu(x)
    return nn.Dense(10)(x)


def train(synced: bool, epochs: int, seed: int = 0, progress: bool = True):
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ("data",))
  n_dev = len(devices)
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25,
                                            random_state=seed)
  model = Net(axis_name="data" if synced else None)
  variables = model.init(jax.random.PRNGKey(seed), x_tr[:8])
  tx = optax.adam(3e-3)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  global_batch = PER_DEVICE * n_dev

  def local_step(params, stats, x, y, valid):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": stats}, x,
                                training=True, mask=valid[:, None],
                                mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      n = jax.lax.psum(jnp.sum(valid), "data")
      return jax.lax.psum(jnp.sum(ce * valid), "data") / n, upd["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    if not synced:  # per-device statistics: keep one replicated state
      new_stats = jax.tree_util.tree_map(lambda v: jax.lax.pmean(v, "data"),
                                         new_stats)
    return loss, new_stats, grads

  sharded = jax.shard_map(local_step, mesh=mesh,
                          in_specs=(P(), P(), P("data"), P("data"), P("data")),
                          out_specs=(P(), P(), P()))

  @jax.jit
  def step(params, stats, opt_state, x, y, valid):
    loss, stats, grads = sharded(params, stats, x, y, valid)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  @jax.jit
  def accuracy(params, stats):
    logits = model.apply({"params": params, "batch_stats": stats}, x_te)
    return jnp.mean(jnp.argmax(logits, -1) == y_te)

  # Replicated on the mesh from the start, as the step returns them: the
  # first step then compiles the program every later step runs.
  replicated = NamedSharding(mesh, P())
  params, stats, opt_state = jax.device_put((params, stats, opt_state),
                                            replicated)
  rng = np.random.RandomState(seed)
  history = []
  label = "synced" if synced else "local"
  for _ in tqdm(range(epochs), desc=f"{label} BN", disable=not progress):
    order = rng.permutation(len(x_tr))
    for start in range(0, len(order), global_batch):
      idx = order[start:start + global_batch]
      valid = np.zeros(global_batch, bool)
      valid[:len(idx)] = True  # the last batch is padded and masked
      idx = np.resize(idx, global_batch)
      params, stats, opt_state, _ = step(params, stats, opt_state, x_tr[idx],
                                         y_tr[idx].astype(np.int32), valid)
    history.append(float(accuracy(params, stats)))
  return history


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("sync_vs_local.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  print(f"{jax.device_count()} devices, {PER_DEVICE} examples per device")
  curves = {name: train(name == "synced", args.epochs)
            for name in ("synced", "local")}
  for name, acc in curves.items():
    print(f"{name:6s} BN: test accuracy {acc[-1]:.4f}")
  plt.figure(figsize=(5, 3.2))
  for name, acc in curves.items():
    plt.plot(np.arange(1, len(acc) + 1), acc, "o-", label=f"{name} BN")
  plt.xlabel("epoch")
  plt.ylabel("test accuracy")
  plt.legend()
  plt.title("8 devices x 8 examples: synced vs local BN")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
