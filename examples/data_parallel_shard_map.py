"""Data-parallel training with shard_map: synced vs local BN on small shards.

Four simulated devices each see 2 digits images per step, a per-device batch
as small as large models leave room for on real accelerators. With
``axis_name='data'`` the jaxbn layers compute statistics over the global batch
of 8 (one all-reduce per layer, exact with masks and uneven shards); without
it each device normalizes with its own 2 examples, as ``pmap`` without
``axis_name`` does, and training-mode outputs stop resembling the inference
ones. A mask drops the padding rows of each epoch's last, partial batch.

Prints every seed's test accuracy (inference mode) for both, a one-line
conclusion computed from them, and saves ``examples/sync_vs_local.png``.

  pip install -e '.[examples]'   # this example's extras
  python examples/data_parallel_shard_map.py [--epochs 4] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import pathlib

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # four CPU devices, beside any other XLA flag already set
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4")

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

import jaxbn  # noqa: E402

PER_DEVICE = 2


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


def make_epoch(synced: bool, mesh: Mesh):
  """One jitted program running a whole epoch of data-parallel steps."""
  model = Net(axis_name="data" if synced else None)
  optimizer = optax.adam(3e-3)

  def local_step(params, batch_stats, x, y, valid):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, x, training=True,
          mask=valid[:, None], mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      n = jax.lax.psum(jnp.sum(valid), "data")
      return jax.lax.psum(jnp.sum(ce * valid), "data") / n, updates[
          "batch_stats"]
    grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
    if not synced:  # per-device statistics: keep one replicated state
      new_stats = jax.tree_util.tree_map(lambda v: jax.lax.pmean(v, "data"),
                                         new_stats)
    return new_stats, grads

  sharded = jax.shard_map(local_step, mesh=mesh,
                          in_specs=(P(), P(), P("data"), P("data"), P("data")),
                          out_specs=(P(), P()))

  @jax.jit
  def epoch(params, batch_stats, opt_state, x, y, valid):
    def step(carry, batch):
      params, batch_stats, opt_state = carry
      batch_stats, grads = sharded(params, batch_stats, *batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats,
              opt_state), None
    carry, _ = jax.lax.scan(step, (params, batch_stats, opt_state),
                            (x, y, valid))
    return carry

  return model, optimizer, epoch


def batches(order, global_batch):
  """An epoch's batches; the last one padded to full size and masked."""
  steps = -(-len(order) // global_batch)
  valid = np.arange(steps * global_batch) < len(order)
  rows = np.resize(order, steps * global_batch)
  return (rows.reshape(steps, global_batch),
          valid.reshape(steps, global_batch))


def train(setup, mesh, epochs, seed):
  model, optimizer, epoch = setup
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25,
                                            random_state=seed,
                                            stratify=digits.target)
  variables = model.init(jax.random.key(seed), x_tr[:8])
  params, batch_stats = variables["params"], variables["batch_stats"]
  # Replicated on the mesh from the start, as the program returns them.
  params, batch_stats, opt_state = jax.device_put(
      (params, batch_stats, optimizer.init(params)), NamedSharding(mesh, P()))
  rng = np.random.RandomState(seed)
  curve = []
  for _ in range(epochs):
    rows, valid = batches(rng.permutation(len(x_tr)),
                          PER_DEVICE * mesh.size)
    params, batch_stats, opt_state = epoch(
        params, batch_stats, opt_state, x_tr[rows],
        y_tr[rows].astype(np.int32), valid)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x_te)
    curve.append(float(jnp.mean(jnp.argmax(logits, -1) == y_te)))
  return curve


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("sync_vs_local.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  print(f"{mesh.size} devices, {PER_DEVICE} examples per device, global "
        f"batch {PER_DEVICE * mesh.size}")
  setups = {name: make_epoch(name == "synced", mesh)
            for name in ("synced", "local")}
  curves = {name: [train(setup, mesh, args.epochs, seed)
                   for seed in args.seeds] for name, setup in setups.items()}
  final = {name: np.array([c[-1] for c in runs])
           for name, runs in curves.items()}
  for i, seed in enumerate(args.seeds):
    print(f"  seed {seed}: synced BN {final['synced'][i]:.4f}   local BN "
          f"{final['local'][i]:.4f}")
  wins = int(np.sum(final["synced"] > final["local"]))
  losses = int(np.sum(final["synced"] < final["local"]))
  verdict = ("synced BN wins for every seed" if wins == len(args.seeds)
             else "mixed")
  print(f"conclusion: {verdict}: ahead in {wins} of {len(args.seeds)} seeds, "
        f"behind in {losses}, mean difference "
        f"{np.mean(final['synced'] - final['local']):+.4f}")

  plt.figure(figsize=(5, 3.2))
  for i, (name, runs) in enumerate(curves.items()):
    for j, acc in enumerate(runs):
      plt.plot(np.arange(1, len(acc) + 1), acc, "o-", color=f"C{i}",
               label=f"{name} BN" if j == 0 else None, alpha=0.7)
  plt.xlabel("epoch")
  plt.ylabel("test accuracy")
  plt.legend()
  plt.title(f"{mesh.size} devices x {PER_DEVICE} examples, "
            f"{len(args.seeds)} seeds")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
