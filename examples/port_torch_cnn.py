"""Port a trained PyTorch CNN with BatchNorm to a channels-last Flax model.

Trains a small PyTorch network (NCHW, BatchNorm2d and BatchNorm1d) on
scikit-learn's digits for one epoch, so its running statistics are real, then
builds its Flax mirror in NHWC: the submodules carry the torch attribute names,
``jaxbn.torch_model_variables(model, axis=-1)`` fills every batch norm, and the
conv and linear weights are transposed by hand (including the flatten order,
which differs between NCHW and NHWC). Compares both models in inference and
in one training step (outputs and every running statistic), and saves a
scatter plot of torch vs jaxbn logits.

  pip install -e '.[examples,interop]'   # this example's extras
  python examples/port_torch_cnn.py [--out examples/port_torch.png]
"""
from __future__ import annotations

import argparse
import math
import pathlib

import flax.linen as nn
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxbn  # noqa: E402

CHANNELS, HIDDEN = 8, 32


class TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.features = torch.nn.Sequential(
        torch.nn.Conv2d(1, CHANNELS, 3, bias=False),
        torch.nn.BatchNorm2d(CHANNELS), torch.nn.ReLU())
    self.fc = torch.nn.Linear(CHANNELS * 6 * 6, HIDDEN)
    self.bn = torch.nn.BatchNorm1d(HIDDEN)
    self.out = torch.nn.Linear(HIDDEN, 10)

  def forward(self, x):
    x = self.features(x).flatten(1)
    return self.out(torch.relu(self.bn(self.fc(x))))


# What from_torch derives from a default torch BatchNorm, for a channels-last
# mirror: Keras' momentum convention, torch's eps and its running variance.
TORCH_BN = dict(axis=-1, momentum=0.9, epsilon=1e-5,
                moving_variance_estimator="unbiased")


class Features(nn.Module):

  @nn.compact
  def __call__(self, x, training):
    x = nn.Conv(CHANNELS, (3, 3), padding="VALID", use_bias=False,
                name="0")(x)
    return nn.relu(jaxbn.BatchNormalization(**TORCH_BN, name="1")(x, training))


class FlaxNet(nn.Module):
  """TorchNet in NHWC, with torch's names, so torch's paths address it."""

  @nn.compact
  def __call__(self, x, training=False):
    x = Features(name="features")(x, training)
    x = nn.Dense(HIDDEN, name="fc")(x.reshape((x.shape[0], -1)))
    x = jaxbn.BatchNormalization(**TORCH_BN, name="bn")(x, training)
    return nn.Dense(10, name="out")(nn.relu(x))


def port(model: TorchNet) -> dict:
  """FlaxNet variables from the torch model."""
  variables = jaxbn.torch_model_variables(model, axis=-1)
  weight = lambda t: t.detach().numpy()
  params = variables["params"]
  # conv: torch OIHW -> Flax HWIO
  params["features"]["0"] = {
      "kernel": weight(model.features[0].weight).transpose(2, 3, 1, 0)}
  # fc: torch flattens (C, H, W), the NHWC mirror (H, W, C)
  fc = weight(model.fc.weight).reshape(HIDDEN, CHANNELS, 6, 6)
  params["fc"] = {"kernel": fc.transpose(2, 3, 1, 0).reshape(-1, HIDDEN),
                  "bias": weight(model.fc.bias)}
  params["out"] = {"kernel": weight(model.out.weight).T,
                   "bias": weight(model.out.bias)}
  return variables


def run(batch_size=64, seed=0):
  torch.manual_seed(seed)
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW
  labels = torch.from_numpy(digits.target)
  model = TorchNet()
  optimizer = torch.optim.Adam(model.parameters(), 1e-2)
  model.train()
  for i in range(0, len(images) - batch_size, batch_size):
    loss = torch.nn.functional.cross_entropy(
        model(torch.from_numpy(images[i:i + batch_size])),
        labels[i:i + batch_size])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  # the derived configuration is the one the mirror uses
  # (torch stores momentum 0.1, and 1 - 0.1 is 0.9 only to 1e-16)
  derived, _ = jaxbn.from_torch(model.bn, axis=-1)
  for key, value in TORCH_BN.items():
    got = getattr(derived, key)
    assert got == value or math.isclose(got, value, abs_tol=1e-9), (key, got)
  variables = port(model)
  batch = images[:256]
  nhwc = batch.transpose(0, 2, 3, 1)
  flax_model = FlaxNet()
  with torch.no_grad():
    t_infer = model.eval()(torch.from_numpy(batch)).numpy()
    t_train = model.train()(torch.from_numpy(batch)).numpy()
  j_infer = np.asarray(flax_model.apply(variables, nhwc))
  j_train, updates = flax_model.apply(variables, nhwc, training=True,
                                      mutable=["batch_stats"])
  after = jaxbn.torch_model_variables(model, axis=-1)["batch_stats"]
  stats_gap = max(np.max(np.abs(np.asarray(a) - b)) for a, b in zip(
      jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(after)))
  return t_infer, j_infer, t_train, np.asarray(j_train), stats_gap


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--out", default=str(pathlib.Path(__file__).with_name("port_torch.png")),
      help="where to save the plot (default: next to this script)")
  args = parser.parse_args()
  t_infer, j_infer, t_train, j_train, stats_gap = run()
  for mode, t, j in (("inference", t_infer, j_infer),
                     ("training", t_train, j_train)):
    print(f"{mode:9s} max |torch - jaxbn| = {np.max(np.abs(t - j)):.2e} "
          f"(logits up to {np.max(np.abs(t)):.1f})")
  print(f"running statistics after the step: max |torch - jaxbn| = "
        f"{stats_gap:.2e}")
  plt.figure(figsize=(4, 4))
  plt.scatter(t_infer.ravel(), j_infer.ravel(), s=3)
  plt.xlabel("PyTorch logits (NCHW)")
  plt.ylabel("Flax + jaxbn logits (NHWC)")
  plt.title("ported model, inference mode")
  plt.tight_layout()
  plt.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
