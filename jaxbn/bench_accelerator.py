"""The GPU/TPU part of ``python -m jaxbn.bench``: jaxbn against
flax.linen.BatchNorm (and PyTorch's CUDA batch norm where torch sees a GPU)
on the device JAX runs on.

* **Layers**: forward+backward (a jitted ``jax.vjp`` with a given cotangent:
  outputs, parameter and input gradients; the CPU benchmark's ``fwd+bwd``)
  at ResNet-50's batch-norm shapes (NHWC), float32 and bfloat16.
* **Network**: a whole training step (``value_and_grad`` and an SGD update)
  of a ResNet-style network, Conv-BN-ReLU blocks with a residual every two,
  20 batch norms and more, at a launch-bound size (small images and
  widths: the step is mostly kernel launches) and a bandwidth-bound one.

* **Memory**: the temporary memory the device's compiler reserves for a
  training step (``memory_analysis()``, per input byte) and the
  conditionals in its compiled program, for jaxbn (plain, a row mask, the
  fused ReLU; gradients of the parameters and x, and of the parameters
  alone) and flax.linen (goal: temp <= 0.05x the input, no conditional).

It prints the medians and the ratios jaxbn / flax (goal: layers <= 0.8,
network steps <= 1.0) and writes ``bench_accelerator.json`` and
``bench_accelerator.png``. Timings are interleaved rounds, as on CPU
(``jaxbn.bench.time_interleaved``). ``--quick`` runs tiny sizes (one layer shape, the
network in bfloat16 only), so that the whole path can be exercised on a CPU.
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

# ResNet-50's batch norms (channels last): (spatial, channels)
RESNET50_LAYERS = [(112, 64), (56, 64), (56, 256), (28, 128), (28, 512),
                   (14, 256), (14, 1024), (7, 512), (7, 2048)]


# The memory section's training steps: (name, config arguments, row mask,
# gradient with respect to: 'all' (parameters and x) or 'params')
MEMORY_CASES = [("plain", {}, False, "all"), ("row mask", {}, True, "all"),
                ("activation='relu'", {"activation": "relu"}, False, "all"),
                ("plain", {}, False, "params"),
                ("activation='relu'", {"activation": "relu"}, False,
                 "params")]
MEMORY_SHAPE = (64, 56, 56, 64)


class Network(NamedTuple):
  name: str
  batch: int
  image: int
  widths: tuple  # channels of each stage (two residual pairs per stage)


NETWORKS = [
    Network("launch-bound (batch 64, 32x32, widths 16-128)", 64, 32,
            (16, 32, 64, 128)),
    Network("bandwidth-bound (batch 256, 64x64, widths 64-512)", 256, 64,
            (64, 128, 256, 512)),
]
QUICK_NETWORKS = [Network("quick (batch 4, 16x16, width 8)", 4, 16,
                          (8, 8, 8, 8))]


def _layer_runners(shape, dtype, seed=0):
  """Forward+backward runners of the CPU benchmark's implementations
  (``jaxbn.bench.jaxbn_impl``, ``flax_impl``), and of torch where it has a
  GPU."""
  import jax
  import jax.numpy as jnp
  from jaxbn import bench
  key = jax.random.PRNGKey(seed)
  x = (jax.random.normal(key, shape, jnp.float32) * 2 + 1).astype(dtype)
  dy = jax.random.normal(jax.random.fold_in(key, 1), shape,
                         jnp.float32).astype(dtype)
  case = bench.Case(f"{shape}", shape, "NHWC", jnp.dtype(dtype).name)
  runners = {"jaxbn": bench.jaxbn_impl(case, x, dy).fwdbwd,
             "flax.linen": bench.flax_impl(case, x, dy).fwdbwd}
  torch_runner = _torch_runner(shape, dtype)
  if torch_runner is not None:
    runners["torch (cuda)"] = torch_runner
  return runners


def _torch_runner(shape, dtype):
  """PyTorch's CUDA batch norm, forward+backward, or None without a GPU."""
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  import jax.numpy as jnp
  torch_dtype = torch.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else (
      torch.float32)
  n, h, w, c = shape
  bn = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.1).cuda()
  x = torch.randn(n, c, h, w, device="cuda", dtype=torch_dtype).to(
      memory_format=torch.channels_last).requires_grad_()
  dy = torch.randn_like(x)

  class Done:  # jax.block_until_ready passes it through
    def block_until_ready(self):
      torch.cuda.synchronize()
      return self

  def run():
    with torch.autocast("cuda", dtype=torch_dtype,
                        enabled=torch_dtype != torch.float32):
      y = bn(x)
    y.backward(dy)
    return Done()

  return run


def _network(norm, widths):
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(norm()(nn.Conv(widths[0], (3, 3), use_bias=False)(x)))
      for stage, width in enumerate(widths):
        for block in range(2):
          stride = 2 if stage and not block else 1
          residual = x
          if stride != 1 or residual.shape[-1] != width:
            residual = norm()(nn.Conv(width, (1, 1), (stride, stride),
                                      use_bias=False)(residual))
          y = nn.relu(norm()(nn.Conv(width, (3, 3), (stride, stride),
                                     use_bias=False)(x)))
          y = norm()(nn.Conv(width, (3, 3), use_bias=False)(y))
          x = nn.relu(y + residual)
      return nn.Dense(10)(x.mean(axis=(1, 2)))

  return Net()


def _network_runners(network: Network, dtype, seed=0):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import jaxbn
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (network.batch, network.image, network.image, 3),
                        jnp.float32).astype(dtype)
  labels = jax.random.randint(jax.random.fold_in(key, 1), (network.batch,),
                              0, 10)
  norms = {
      "jaxbn": lambda: jaxbn.BatchNormalization(momentum=0.9),
      "flax.linen": lambda: nn.BatchNorm(use_running_average=False,
                                         momentum=0.9, epsilon=1e-3,
                                         dtype=dtype),
  }
  runners, counts = {}, {}
  for name, norm in norms.items():
    if name == "jaxbn":
      norm = functools.partial(_training, norm)
    model = _network(norm, network.widths)
    variables = model.init(key, x)
    counts[name] = len(variables["batch_stats"])

    def loss(params, stats, model=model):
      logits, updates = model.apply({"params": params, "batch_stats": stats},
                                    x, mutable=["batch_stats"])
      one_hot = jax.nn.one_hot(labels, 10)
      value = -jnp.mean(jnp.sum(jax.nn.log_softmax(
          logits.astype(jnp.float32)) * one_hot, -1))
      return value, updates["batch_stats"]

    @jax.jit
    def step(params, stats, loss=loss):
      (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(
          params, stats)
      params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
      return params, stats, value

    runners[name] = functools.partial(step, variables["params"],
                                      variables["batch_stats"])
  assert counts["jaxbn"] == counts["flax.linen"] >= 20, counts
  return runners, counts["jaxbn"]


class _training:
  """A jaxbn layer that a Linen network calls as ``norm()(x)``, in training."""

  def __init__(self, make):
    self.layer = make()

  def __call__(self, x):
    return self.layer(x, training=True)


def run(quick: bool = False, repeats: int | None = None, burst: int = 3,
        out: str = "bench_results") -> dict:
  """Runs the layers and the networks; writes JSON and a chart into ``out``
  and returns the report."""
  import jax
  import jax.numpy as jnp
  from jaxbn.bench import time_interleaved, versions
  repeats = repeats or (3 if quick else 20)
  batch = 2 if quick else 64
  layers = [(8, 64)] if quick else RESNET50_LAYERS
  device = jax.devices()[0]
  report = {"device": getattr(device, "device_kind", str(device)),
            "platform": device.platform, "versions": versions(),
            "repeats": repeats, "layers": [], "networks": [], "memory": []}
  for dtype in (jnp.float32, jnp.bfloat16):
    for spatial, channels in layers:
      shape = (batch, spatial, spatial, channels)
      print(f"layer {shape} {jnp.dtype(dtype).name} ...", flush=True)
      times = time_interleaved(_layer_runners(shape, dtype), repeats, burst,
                               seed=f"{shape} {dtype}")
      report["layers"].append(_summary(
          {"shape": shape, "dtype": jnp.dtype(dtype).name}, times))
  for network in (QUICK_NETWORKS if quick else NETWORKS):
    for dtype in (jnp.bfloat16,) if quick else (jnp.float32, jnp.bfloat16):
      print(f"network {network.name} {jnp.dtype(dtype).name} ...", flush=True)
      runners, batch_norms = _network_runners(network, dtype)
      times = time_interleaved(runners, repeats, burst,
                               seed=f"{network} {dtype}")
      report["networks"].append(_summary(
          {"network": network.name, "dtype": jnp.dtype(dtype).name,
           "batch_norms": batch_norms}, times))
  shape = (2, 8, 8, 64) if quick else MEMORY_SHAPE
  for dtype in (jnp.float32, jnp.bfloat16):
    print(f"memory {shape} {jnp.dtype(dtype).name} ...", flush=True)
    report["memory"] += _memory_rows(shape, dtype)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "bench_accelerator.json"), "w") as f:
    json.dump(report, f, indent=1)
  table = format_report(report)
  with open(os.path.join(out, "bench_accelerator.md"), "w") as f:
    f.write(table + "\n")
  _plot(report, os.path.join(out, "bench_accelerator.png"))
  print(table)
  print(f"wrote {out}/bench_accelerator.json, .md, .png")
  return report


def _memory_rows(shape, dtype) -> list:
  """Temp memory ÷ input bytes and conditionals of each compiled training
  step of :data:`MEMORY_CASES` (loss ``sum(y * dy)``), then flax.linen's."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import jaxbn
  x = jnp.ones(shape, dtype)
  rows = []

  def measure(step, args, what):
    compiled = jax.jit(step).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows.append(dict(what, shape=shape, dtype=jnp.dtype(dtype).name,
                     temp_over_input=temp / x.nbytes,
                     conditionals=compiled.as_text().count(" conditional(")))

  for name, arguments, masked, wrt in MEMORY_CASES:
    config = jaxbn.BatchNormConfig(**arguments)
    params, state = jaxbn.init(config, shape)
    mask = (jnp.arange(shape[0]) % 3 != 0) if masked else None

    def step(params, x, dy, config=config, state=state, mask=mask, wrt=wrt):
      def loss(params, x):
        y, _ = jaxbn.apply(config, params, state, x, training=True,
                           mask=mask)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1) if wrt == "all" else 0)(params, x)

    measure(step, (params, x, x), {"implementation": "jaxbn", "case": name,
                                   "gradient": wrt})
  bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3,
                    dtype=dtype)
  variables = bn.init(jax.random.PRNGKey(0), x)

  def flax_step(params, x, dy):
    def loss(params, x):
      y, _ = bn.apply({"params": params,
                       "batch_stats": variables["batch_stats"]}, x,
                      mutable=["batch_stats"])
      return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  measure(flax_step, (variables["params"], x, x),
          {"implementation": "flax.linen", "case": "plain", "gradient": "all"})
  return rows


def _summary(what, times):
  import numpy as np
  median = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
  return dict(what, median_ms=median,
              jaxbn_over_flax=median["jaxbn"] / median["flax.linen"])


def format_report(report) -> str:
  lines = [f"# jaxbn on {report['device']} ({report['platform']})", "",
           "## Batch norm forward+backward (goal: jaxbn / flax <= 0.8)",
           "| shape | dtype | jaxbn ms | flax.linen ms | torch ms | "
           "jaxbn / flax |", "|---|---|---|---|---|---|"]
  for row in report["layers"]:
    ms = row["median_ms"]
    torch = ms.get("torch (cuda)")
    lines.append(f"| {tuple(row['shape'])} | {row['dtype']} | "
                 f"{ms['jaxbn']:.3f} | {ms['flax.linen']:.3f} | "
                 f"{'-' if torch is None else f'{torch:.3f}'} | "
                 f"{row['jaxbn_over_flax']:.2f} |")
  lines += ["", "## Training step of a ResNet-style network "
            "(goal: jaxbn / flax <= 1.0)",
            "| network | dtype | batch norms | jaxbn ms | flax.linen ms | "
            "jaxbn / flax |", "|---|---|---|---|---|---|"]
  for row in report["networks"]:
    ms = row["median_ms"]
    lines.append(f"| {row['network']} | {row['dtype']} | "
                 f"{row['batch_norms']} | {ms['jaxbn']:.3f} | "
                 f"{ms['flax.linen']:.3f} | {row['jaxbn_over_flax']:.2f} |")
  lines += ["", "## Compiled training step: temp memory and conditionals "
            "(goal: temp <= 0.05x the input, no conditional)",
            "| implementation | case | gradient of | shape | dtype | "
            "temp (x input) | conditionals |", "|---|---|---|---|---|---|---|"]
  for row in report.get("memory", []):
    lines.append(f"| {row['implementation']} | {row['case']} | "
                 f"{'parameters and x' if row['gradient'] == 'all' else 'parameters'} | "
                 f"{tuple(row['shape'])} | {row['dtype']} | "
                 f"{row['temp_over_input']:.3f} | {row['conditionals']} |")
  return "\n".join(lines)


def _plot(report, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = report["layers"] + report["networks"]
  labels = [f"{tuple(r['shape'])} {r['dtype']}" if "shape" in r else
            f"{r['network'].split(' (')[0]} {r['dtype']}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 3.8))
  ax.bar(range(len(rows)), [r["jaxbn_over_flax"] for r in rows])
  ax.axhline(1.0, color="k", lw=0.5)
  ax.axhline(0.8, color="k", lw=0.5, ls="--")
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("jaxbn time / flax.linen time")
  ax.set_title(f"jaxbn on {report['device']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
