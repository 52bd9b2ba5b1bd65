"""``python -m jaxbn.bench``: batch norm speed and memory traffic, side by side.

For ResNet-50 activation shapes (NHWC and NCHW, float32 and bfloat16, a
DRAM-sized and an in-cache size, plus the last stage's 2048 channels) it
times, in one process and interleaved:

* ``fwd``: the training forward pass (batch statistics + state update);
* ``fwd+bwd``: a jitted ``jax.vjp`` with a given cotangent (outputs and every
  gradient), the way a training step runs it;
* ``infer``: inference with the moving statistics;

for jaxbn (as installed: with its CPU kernels where they apply), jaxbn in XLA
alone, flax.linen, haiku, equinox, tf_keras (fused and not) and torch, each
where installed. Every time is also given as a ratio to one elementwise
pass ``x * a + b`` over the same tensor in the same run (float32 arithmetic for
bf16). For JAX implementations it reports the bytes moved (XLA's
``cost_analysis`` plus the operands and results of jaxbn's kernels, which XLA
counts as nothing) and temp memory (``memory_analysis``) as multiples of the
input size, the bytes saved for the backward pass beyond the input, and the
compile time.

XLA:CPU allocates its outputs with malloc. By default glibc hands freed
multi-MB buffers back to the kernel (``mmap``'d chunks, heap trimming), and
the next call's outputs then fault in page by page: 4096 faults per 16 MB
output were seen, costing more than the batch norm itself, and landing on
whichever implementation's allocation pattern trips them (torch keeps its own
cache). The benchmark therefore re-executes itself with ``GLIBC_TUNABLES``
that keep freed memory in the process and back it with huge pages
(``_MALLOC_TUNABLES``; disable with ``--no-malloc-tuning``). It reports min
and median of interleaved rounds (``--repeats``, four times as many for
inputs under 32 MB, whose sub-millisecond calls are the noisiest); in each
round every implementation runs once untimed, then ``--burst`` times timed,
so that an in-cache case is measured in cache.

It then times the Keras features (renorm, ghost batches, masks, adjustment,
axis lists) forward+backward against plain jaxbn and flax.linen at an in-cache
and a 100 MB size, and a 4-layer MLP training step against the same net with
flax.linen.BatchNorm and without batch norm.

  python -m jaxbn.bench [--quick] [--out bench_results] [--repeats 15]
                        [--burst 3] [--skip-features | --features-only]

On a GPU or TPU (or with ``--accelerator``) it runs ``jaxbn.bench_accelerator``
instead: jaxbn against flax.linen (and PyTorch's CUDA batch norm) at ResNet-50
layer shapes and in a whole ResNet-style training step.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from typing import Callable, NamedTuple

from jaxbn.traffic import ordinary_path_bytes

_MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",  # transparent huge pages for the heap
    "glibc.malloc.mmap_max=0",  # large buffers from the heap, not mmap
    "glibc.malloc.trim_threshold=17179869184",  # never shrink the heap
    "glibc.malloc.arena_max=1",  # one heap for all threads
)


def _maybe_reexec(args):
  current = os.environ.get("GLIBC_TUNABLES", "")
  missing = [t for t in _MALLOC_TUNABLES if t not in current.split(":")]
  if args.no_malloc_tuning or not missing:
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (current, *missing) if t)
  os.execve(sys.executable, [sys.executable, "-m", "jaxbn.bench"]
            + sys.argv[1:], env)


class Case(NamedTuple):
  name: str
  shape: tuple
  layout: str  # "NHWC" or "NCHW"
  dtype: str

  @property
  def axis(self):
    return -1 if self.layout == "NHWC" else 1

  @property
  def channels(self):
    return self.shape[self.axis]

  @property
  def nbytes(self):
    return math.prod(self.shape) * (4 if self.dtype == "float32" else 2)

  def rounds(self, repeats: int) -> int:
    """Interleaved rounds: ``repeats``, or 4x that under 32 MB.

    Calls on smaller tensors last a millisecond or less, where one thread
    descheduled for a moment moves a median by 20%: on the wide case,
    jaxbn's inference ratio to the elementwise pass spread over 0.93-1.35
    across three seeds with 15 rounds and 0.93-1.08 with 60.
    """
    return repeats * (4 if self.nbytes < 32 << 20 else 1)


def cases(quick: bool):
  sizes = ([("in-cache", (64, 32, 32, 64))] if quick else
           [("DRAM", (128, 56, 56, 64)), ("in-cache", (64, 32, 32, 64))])
  out = []
  for label, (n, h, w, c) in sizes:
    for dtype in ("float32", "bfloat16"):
      out.append(Case(f"{label} NHWC {dtype}", (n, h, w, c), "NHWC", dtype))
    out.append(Case(f"{label} NCHW float32", (n, c, h, w), "NCHW",
                    "float32"))
  if not quick:  # ResNet-50's last stage: few rows, many channels
    out.append(Case("wide NHWC float32", (32, 7, 7, 2048), "NHWC", "float32"))
  return out


class Impl(NamedTuple):
  fwd: Callable | None
  fwdbwd: Callable | None
  infer: Callable | None
  jax_fns: dict  # mode -> (jitted fn, args) for XLA analyses


def _installed(name):
  try:
    importlib.import_module(name)
    return True
  except Exception:  # noqa: BLE001  (any import failure means "not here")
    return False


# ----------------------------------------------------------- JAX libraries


def _jax_impl(apply_train, apply_infer, params, x, dy, tracing=None):
  """Wraps pure train/infer functions of (params, x) into timed callables.

  ``tracing``: a context manager factory entered whenever a function is
  traced (the backward pass is traced inside ``fwdbwd``).
  """
  import contextlib
  import jax
  tracing = tracing or contextlib.nullcontext

  def traced(fn):
    def wrapped(*args):
      with tracing():
        return fn(*args)
    return wrapped

  fwd = jax.jit(traced(apply_train))

  @traced
  def fwdbwd_fn(params, x, dy):
    y, vjp = jax.vjp(lambda p, x: apply_train(p, x)[0], params, x)
    return y, vjp(dy)

  fwdbwd = jax.jit(fwdbwd_fn)
  infer = jax.jit(traced(apply_infer))
  return Impl(lambda: fwd(params, x), lambda: fwdbwd(params, x, dy),
              lambda: infer(params, x),
              {"fwd": (fwd, (params, x)), "fwd+bwd": (fwdbwd, (params, x, dy)),
               "infer": (infer, (params, x)),
               "_residuals": (fwdbwd_fn, apply_train, params, x)})


def jaxbn_impl(case, x, dy, kernels=None):
  """jaxbn as users get it (``kernels=None``), or with the CPU kernels forced
  ``'on'``/``'off'`` while its functions are traced."""
  import functools
  import jaxbn
  from jaxbn import cpu_kernels
  config = jaxbn.BatchNormConfig(axis=case.axis)
  params, state = jaxbn.init(config, x.shape)
  train = lambda p, x: jaxbn.apply(config, p, state, x, training=True)
  infer = lambda p, x: jaxbn.apply(config, p, state, x, training=False)[0]
  tracing = functools.partial(cpu_kernels.use, kernels) if kernels else None
  return _jax_impl(train, infer, params, x, dy, tracing)


def jaxbn_xla_impl(case, x, dy):
  return jaxbn_impl(case, x, dy, kernels="off")


def flax_impl(case, x, dy):
  import flax.linen as nn
  import jax
  layer = nn.BatchNorm(axis=case.axis, momentum=0.99, epsilon=1e-3,
                       dtype=x.dtype)
  variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)
  stats = variables["batch_stats"]
  train = lambda p, x: layer.apply({"params": p, "batch_stats": stats}, x,
                                   use_running_average=False,
                                   mutable=["batch_stats"])
  infer = lambda p, x: layer.apply({"params": p, "batch_stats": stats}, x,
                                   use_running_average=True)
  return _jax_impl(train, infer, variables["params"], x, dy)


def haiku_impl(case, x, dy):
  import haiku as hk
  import jax
  fmt = "channels_last" if case.layout == "NHWC" else "channels_first"

  def forward(x, is_training):
    bn = hk.BatchNorm(True, True, 0.99, eps=1e-3, data_format=fmt)
    return bn(x, is_training=is_training)

  model = hk.without_apply_rng(hk.transform_with_state(forward))
  params, state = model.init(jax.random.PRNGKey(0), x, True)
  train = lambda p, x: model.apply(p, state, x, True)
  infer = lambda p, x: model.apply(p, state, x, False)[0]
  return _jax_impl(train, infer, params, x, dy)


def equinox_impl(case, x, dy):
  if case.layout != "NCHW":
    return None  # equinox normalizes per-example (C, ...) inputs
  import equinox as eqx
  import jax
  bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
      case.channels, axis_name="batch", mode="batch", momentum=0.99,
      eps=1e-3, dtype=x.dtype)
  params, static = eqx.partition(bn, eqx.is_inexact_array)

  leaves, treedef = jax.tree_util.tree_flatten(state)

  def run(p, x, inference):
    model = eqx.combine(p, static)
    fresh = jax.tree_util.tree_unflatten(treedef, leaves)  # equinox: no reuse
    return jax.vmap(lambda xi: model(xi, fresh, inference=inference),
                    axis_name="batch", out_axes=(0, None))(x)

  train = lambda p, x: run(p, x, False)
  infer = lambda p, x: run(p, x, True)[0]
  return _jax_impl(train, infer, params, x, dy)


def elementwise_impl(case, x, dy):
  """The baseline: one pass ``x * a + b`` with per-channel a, b (f32 math)."""
  import jax
  import jax.numpy as jnp
  shape = [1] * x.ndim
  shape[case.axis] = case.channels
  a = jnp.full(shape, 1.5, jnp.float32)
  b = jnp.full(shape, 0.5, jnp.float32)
  fn = jax.jit(lambda x, a, b: (x.astype(jnp.float32) * a + b).astype(
      x.dtype))
  run = lambda: fn(x, a, b)
  return Impl(run, run, run, {"infer": (fn, (x, a, b))})


# --------------------------------------------------------- other libraries


def keras_impl(fused):
  def make(case, x, dy):
    if case.dtype != "float32" and fused:
      return None
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf
    import tf_keras
    xt = tf.constant(np.asarray(x.astype("float32")), dtype=case.dtype)
    dyt = tf.constant(np.asarray(dy.astype("float32")), dtype=case.dtype)
    if case.layout == "NCHW" and fused:
      return None  # TF's CPU fused kernel has no NCHW training path
    layer = tf_keras.layers.BatchNormalization(axis=case.axis, fused=fused,
                                               dtype=case.dtype)
    layer.build(xt.shape)

    @tf.function(jit_compile=False)
    def fwd(x):
      return layer(x, training=True)

    @tf.function(jit_compile=False)
    def fwdbwd(x, dy):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
      return y, tape.gradient(y, [x] + layer.trainable_weights,
                              output_gradients=dy)

    @tf.function(jit_compile=False)
    def infer(x):
      return layer(x, training=False)

    def sync(result):
      tf.nest.map_structure(lambda t: t.numpy()[(0,) * t.ndim] if t.ndim
                            else t.numpy(), result)
      return result

    return Impl(lambda: sync(fwd(xt)), lambda: sync(fwdbwd(xt, dyt)),
                lambda: sync(infer(xt)), {})
  return make


def torch_impl(case, x, dy):
  import numpy as np
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
  xn = np.array(x.astype("float32"))
  dyn = np.array(dy.astype("float32"))
  if case.layout == "NHWC":
    # torch's NHWC is the channels_last memory format of an NCHW tensor
    xt = torch.from_numpy(xn).permute(0, 3, 1, 2).to(dtype)
    dyt = torch.from_numpy(dyn).permute(0, 3, 1, 2).to(dtype)
    fmt = torch.channels_last
  else:
    xt, dyt, fmt = (torch.from_numpy(xn).to(dtype),
                    torch.from_numpy(dyn).to(dtype), torch.contiguous_format)
  xt = xt.contiguous(memory_format=fmt).requires_grad_(True)
  dyt = dyt.contiguous(memory_format=fmt)
  bn = torch.nn.BatchNorm2d(case.channels, eps=1e-3, momentum=0.01).to(
      dtype).to(memory_format=fmt)

  def fwd():
    with torch.no_grad():
      return bn.train()(xt)

  def fwdbwd():
    xt.grad = None
    bn.zero_grad(set_to_none=True)
    y = bn.train()(xt)
    y.backward(dyt)
    return y

  def infer():
    with torch.no_grad():
      return bn.eval()(xt)

  return Impl(fwd, fwdbwd, infer, {})


IMPLS = {
    "jaxbn": ("jax", jaxbn_impl),
    "jaxbn (XLA only)": ("jax", jaxbn_xla_impl),
    "flax.linen": ("flax", flax_impl),
    "haiku": ("haiku", haiku_impl),
    "equinox": ("equinox", equinox_impl),
    "tf_keras fused": ("tf_keras", keras_impl(True)),
    "tf_keras": ("tf_keras", keras_impl(False)),
    "torch": ("torch", torch_impl),
}
MODES = ("fwd", "fwd+bwd", "infer")


# ----------------------------------------------------------------- analyses


def xla_analysis(jax_fns, input_bytes):
  import jax
  out = {}
  for mode in MODES:
    if mode not in jax_fns:
      continue
    fn, args = jax_fns[mode]
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    out[mode] = {
        "bytes_accessed_x_input": ordinary_path_bytes(fn, *args) / input_bytes,
        "temp_x_input": memory.temp_size_in_bytes / input_bytes,
        "compile_s": compile_s,
    }
  if "_residuals" in jax_fns:
    # Everything jax.vjp keeps for the backward pass, less one copy of x
    # (which any implementation may keep: it is alive anyway).
    _, train, params, x = jax_fns["_residuals"]
    _, vjp_fn = jax.vjp(lambda p, x: train(p, x)[0], params, x)
    saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_fn)
                if hasattr(leaf, "nbytes"))
    out["saved_beyond_input_x_input"] = (saved - x.nbytes) / input_bytes
  return out


# ------------------------------------------------------------------ timing


def time_interleaved(runners, repeats, burst=3, seed=0):
  """``runners``: name -> callable. Returns name -> list of seconds.

  Rounds are interleaved (every implementation once per round, so drift of
  the machine hits all alike), each round in a new random order (from
  ``seed``): an implementation that always ran right after torch or
  TensorFlow would share the cores with their still-spinning thread pools
  every time (that slows the next sub-millisecond call by up to 2x). Within
  a round each runs once untimed and then ``burst`` times back to back,
  timed. Without the untimed call an in-cache case would be measured with
  its input evicted by the previous implementation's outputs, which says
  nothing about the implementation.
  """
  import random
  import jax
  times = {name: [] for name in runners}
  for run in runners.values():  # warm up (compile, allocate)
    jax.block_until_ready(run())
  order = list(runners.items())
  shuffle = random.Random(seed).shuffle
  for _ in range(repeats):
    shuffle(order)
    for name, run in order:
      jax.block_until_ready(run())
      for _ in range(burst):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times[name].append(time.perf_counter() - start)
  return times


def run_case(case, names, repeats, seed=0, burst=3):
  import jax
  import jax.numpy as jnp
  import numpy as np
  key = jax.random.PRNGKey(seed)
  dtype = jnp.dtype(case.dtype)
  x = (jax.random.normal(key, case.shape, jnp.float32) * 2 + 1).astype(dtype)
  dy = jax.random.normal(jax.random.fold_in(key, 1), case.shape,
                         jnp.float32).astype(dtype)
  impls = {"elementwise": elementwise_impl(case, x, dy)}
  skipped = {}
  for name in names:
    module, factory = IMPLS[name]
    if not _installed(module):
      skipped[name] = f"{module} not installed"
      continue
    try:
      impl = factory(case, x, dy)
    except Exception as e:  # noqa: BLE001  (report, keep benchmarking)
      skipped[name] = f"{type(e).__name__}: {e}"[:200]
      continue
    if impl is None:
      skipped[name] = "not applicable to this layout/dtype"
      continue
    impls[name] = impl
  result = {"case": case._asdict(), "input_bytes": x.nbytes, "modes": {},
            "xla": {}, "skipped": skipped, "rounds": repeats}
  for name, impl in impls.items():
    if impl.jax_fns and name != "elementwise":
      result["xla"][name] = xla_analysis(impl.jax_fns, x.nbytes)
  if "infer" in impls["elementwise"].jax_fns:
    result["xla"]["elementwise"] = xla_analysis(
        impls["elementwise"].jax_fns, x.nbytes)
  for mode in MODES:
    runners = {name: getattr(impl, mode.replace("+", ""))
               for name, impl in impls.items()}
    runners = {n: r for n, r in runners.items() if r is not None}
    times = time_interleaved(runners, repeats, burst,
                             seed=f"{case.name} {mode} {seed}")
    base = float(np.median(times["elementwise"]))
    result["modes"][mode] = {
        name: {"median_ms": 1e3 * float(np.median(t)),
               "min_ms": 1e3 * float(np.min(t)),
               "x_elementwise": float(np.median(t)) / base}
        for name, t in times.items()}
  return result


# ------------------------------------------------ Keras features, whole net


def feature_configs():
  """Name -> (config arguments, needs a mask): the features compared with
  plain jaxbn on one NHWC float32 tensor."""
  import jax
  adjust = lambda shape, key: (
      jax.random.uniform(key, shape[-1:], minval=0.93, maxval=1.07),
      jax.random.uniform(jax.random.fold_in(key, 1), shape[-1:],
                         minval=-0.1, maxval=0.1))
  return {
      "plain": ({}, False),
      "renorm + clipping": (
          dict(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3,
                                             "dmax": 5.0}), False),
      "virtual_batch_size=8 (ghost)": (dict(virtual_batch_size=8), False),
      "mask (per row)": ({}, True),
      "adjustment": (dict(adjustment=adjust), False),
      "axis list [2, 3]": (dict(axis=[2, 3]), False),
  }


def run_features(shape, repeats, burst=3, seed=0):
  """Forward+backward (jitted ``jax.vjp`` with a cotangent) of every feature
  and of flax.linen's plain BatchNorm, interleaved in one process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jaxbn
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, shape, jnp.float32) * 2 + 1
  dy = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32)
  mask = jax.random.uniform(jax.random.fold_in(key, 2),
                            (shape[0],) + (1,) * (len(shape) - 1)) > 0.25
  runners, analyses = {}, {}
  for name, (arguments, masked) in feature_configs().items():
    config = jaxbn.BatchNormConfig(**arguments)
    params, state = jaxbn.init(config, shape)

    def train(p, x, config=config, state=state, masked=masked):
      return jaxbn.apply(config, p, state, x, training=True, key=key,
                         mask=mask if masked else None)[0]

    step = jax.jit(lambda p, x, dy, train=train: (
        lambda out: (out[0], out[1](dy)))(jax.vjp(train, p, x)))
    compiled = step.lower(params, x, dy).compile()
    # the timed runner is that executable (calling ``step`` would compile
    # the same program again in jit's own cache)
    runners[name] = functools.partial(compiled, params, x, dy)
    analyses[name] = {"bytes_accessed_x_input":
                      ordinary_path_bytes(step, params, x, dy) / x.nbytes,
                      "temp_x_input": compiled.memory_analysis()
                      .temp_size_in_bytes / x.nbytes}
  flax = flax_impl(Case("features", shape, "NHWC", "float32"), x, dy)
  runners["flax.linen (plain)"] = flax.fwdbwd
  times = time_interleaved(runners, repeats, burst,
                           seed=f"features {shape} {seed}")
  median = {n: float(np.median(t)) for n, t in times.items()}
  return {"shape": list(shape), "input_bytes": x.nbytes, "rounds": repeats,
          "median_ms": {n: 1e3 * m for n, m in median.items()},
          "x_plain_jaxbn": {n: m / median["plain"] for n, m in median.items()},
          "x_flax": {n: m / median["flax.linen (plain)"]
                     for n, m in median.items()},
          "xla": analyses}


def _mlp(norm_relu, width=64, depth=4):
  """Dense -> norm -> relu, ``depth`` times, then a linear head.
  ``norm_relu(x)`` builds its modules inside the network's call and applies
  the ReLU too (None: Dense with biases, then relu)."""
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(depth):
        x = nn.Dense(width, use_bias=norm_relu is None)(x)
        x = nn.relu(x) if norm_relu is None else norm_relu(x)
      return nn.Dense(1)(x)
  return MLP()


def run_mlp(rows, repeats, burst=3, seed=0):
  """A training step (``value_and_grad`` + updated statistics) of a 4-layer
  MLP with jaxbn (its fused ``activation='relu'``, and followed by
  ``nn.relu``), with flax.linen.BatchNorm, and without batch norm (biases
  instead): the whole-step ratios and batch norm's share of the step."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jaxbn
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (rows, 64), jnp.float32)
  target = jax.random.normal(jax.random.fold_in(key, 1), (rows, 1))
  norms = {
      "jaxbn (activation='relu')": lambda x: jaxbn.BatchNormalization(
          momentum=0.9, activation="relu")(x, training=True),
      "jaxbn, then nn.relu": lambda x: nn.relu(jaxbn.BatchNormalization(
          momentum=0.9)(x, training=True)),
      "flax.linen": lambda x: nn.relu(nn.BatchNorm(
          use_running_average=False, momentum=0.9, epsilon=1e-3)(x)),
      "no batch norm": None,
  }
  # flax's model unchanged, its batch norms through jaxbn (a model zoo's
  # path): traced inside jaxbn.linen.replace_batch_norm
  zoo = "jaxbn via replace_batch_norm (the flax.linen model)"
  norms[zoo] = norms["flax.linen"]
  runners = {}
  for name, norm in norms.items():
    model = _mlp(norm)
    variables = model.init(key, x)
    params = variables["params"]
    stats = variables.get("batch_stats", {})

    def loss(params, stats, x, model=model):
      out, updates = model.apply({"params": params, "batch_stats": stats}, x,
                                 mutable=["batch_stats"])
      return jnp.mean((out - target) ** 2), updates

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if name == zoo:
      with jaxbn.linen.replace_batch_norm():
        step = step.lower(params, stats, x).compile()
    runners[name] = functools.partial(step, params, stats, x)
  times = time_interleaved(runners, repeats, burst, seed=f"mlp {seed}")
  median = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
  base, flax = median["no batch norm"], median["flax.linen"]
  jaxbn_nets = [n for n in median if n.startswith("jaxbn")]
  return {"rows": rows, "rounds": repeats, "median_ms": median,
          "step_over_flax": {n: median[n] / flax for n in jaxbn_nets},
          "bn_share_over_flax": {n: (median[n] - base) / (flax - base)
                                 for n in jaxbn_nets}}


def format_features(features, mlp):
  lines = []
  for res in features:
    lines.append(f"\n## Keras features, forward+backward, shape="
                 f"{tuple(res['shape'])} float32 "
                 f"({res['input_bytes'] / 1e6:.0f} MB)")
    lines.append("| feature | ms | x plain jaxbn | x flax.linen (plain) "
                 "| fwd+bwd bytes (x input) | temp (x input) |")
    lines.append("|---|---|---|---|---|---|")
    for name, ms in res["median_ms"].items():
      xla = res["xla"].get(name)
      lines.append(
          f"| {name} | {ms:.2f} | {res['x_plain_jaxbn'][name]:.2f} | "
          f"{res['x_flax'][name]:.2f} | "
          + (f"{xla['bytes_accessed_x_input']:.2f} | "
             f"{xla['temp_x_input']:.2f} |" if xla else "— | — |"))
  if mlp:
    lines.append(f"\n## 4-layer MLP training step, input ({mlp['rows']}, 64)")
    lines.append("| network | ms | step x flax.linen | batch norm's share "
                 "(step minus the net without it) x flax.linen's |")
    lines.append("|---|---|---|---|")
    for name, ms in mlp["median_ms"].items():
      step = mlp["step_over_flax"].get(name)
      share = mlp["bn_share_over_flax"].get(name)
      lines.append(f"| {name} | {ms:.2f} | "
                   + ("— | — |" if step is None else
                      f"{step:.2f} | {share:.2f} |"))
  return "\n".join(lines)


def versions():
  out = {"python": platform.python_version(), "machine": platform.machine(),
         "cpus": os.cpu_count(),
         "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}
  # from the installed distributions' metadata: importing TensorFlow and
  # torch only to read their versions took 6 s
  for module, distribution in (
      ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
      ("haiku", "dm-haiku"), ("equinox", "equinox"),
      ("tensorflow", "tensorflow"), ("tf_keras", "tf-keras"),
      ("torch", "torch"), ("jaxbn", "jaxbn")):
    try:
      out[module] = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
      pass
  import jax
  out["backend"] = jax.default_backend()
  out["devices"] = [str(d) for d in jax.devices()[:1]]
  return out


# ------------------------------------------------------------------ output


def format_table(results):
  lines = []
  for res in results:
    case = res["case"]
    lines.append(f"\n## {case['name']}  shape={tuple(case['shape'])}  "
                 f"({res['input_bytes'] / 1e6:.0f} MB)")
    lines.append("| implementation | fwd ms (x elem) | fwd+bwd ms (x elem) "
                 "| infer ms (x elem) | fwd+bwd bytes (x input) "
                 "| fwd+bwd temp (x input) | saved beyond x (x input) "
                 "| compile s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    names = list(res["modes"]["fwd"])
    for name in names:
      cells = []
      for mode in MODES:
        m = res["modes"][mode].get(name)
        cells.append("—" if m is None else
                     f"{m['median_ms']:.2f} ({m['x_elementwise']:.2f})")
      xla = res["xla"].get(name, {})
      fb = xla.get("fwd+bwd", {})
      saved = xla.get("saved_beyond_input_x_input")
      cells += [f"{fb['bytes_accessed_x_input']:.2f}" if fb else "—",
                f"{fb['temp_x_input']:.2f}" if fb else "—",
                f"{saved:.3f}" if saved is not None else "—",
                f"{fb['compile_s']:.2f}" if fb else "—"]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = []
    for mode in ("fwd+bwd", "infer"):
      for name in ("jaxbn", "jaxbn (XLA only)"):
        ours = res["modes"][mode].get(name)
        for other in ("flax.linen", "tf_keras fused"):
          theirs = res["modes"][mode].get(other)
          if ours and theirs:
            ratios.append(f"{mode} {name}/{other} = "
                          f"{ours['median_ms'] / theirs['median_ms']:.2f}")
    if ratios:
      lines.append("\n" + "; ".join(ratios))
    if res["skipped"]:
      lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in
                                           res["skipped"].items()))
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6),
                           squeeze=False)
  for ax, res in zip(axes[0], results):
    names = [n for n in res["modes"]["fwd+bwd"] if n != "elementwise"]
    pos = np.arange(len(names))
    for i, mode in enumerate(MODES):
      vals = [res["modes"][mode].get(n, {}).get("x_elementwise", np.nan)
              for n in names]
      ax.bar(pos + (i - 1) * 0.27, vals, 0.27, label=mode)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_title(res["case"]["name"], fontsize=9)
    ax.set_ylabel("time / one elementwise pass")
    ax.axhline(1.0, color="k", lw=0.5)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description="jaxbn benchmark")
  parser.add_argument("--quick", action="store_true",
                      help="one in-cache size, fewer repeats")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved rounds (default 15, --quick 5; 4x "
                      "that for inputs under 32 MB)")
  parser.add_argument("--burst", type=int, default=3,
                      help="timed back-to-back calls per implementation and "
                      "round, after one untimed call")
  parser.add_argument("--cases", default=None,
                      help="comma-separated case names to run (of those "
                      "--quick or the full run selects), e.g. 'in-cache NHWC "
                      "float32'")
  parser.add_argument("--out", default="bench_results")
  parser.add_argument("--impls", default=",".join(IMPLS),
                      help="comma-separated subset of " + ",".join(IMPLS))
  features_arg = parser.add_mutually_exclusive_group()
  features_arg.add_argument("--skip-features", action="store_true",
                            help="leave out the Keras-feature and MLP cases")
  features_arg.add_argument("--features-only", action="store_true",
                            help="only the Keras-feature and MLP cases")
  parser.add_argument("--accelerator", action="store_true",
                      help="the GPU/TPU suite (jaxbn.bench_accelerator): "
                      "the default where JAX's device is a GPU or TPU; with "
                      "--quick, tiny sizes that run anywhere")
  parser.add_argument("--no-malloc-tuning", action="store_true",
                      help="do not re-execute with GLIBC_TUNABLES that keep "
                      "freed memory in the process")
  args = parser.parse_args(argv)
  _maybe_reexec(args)
  import jax
  if args.accelerator or jax.default_backend() != "cpu":
    from jaxbn import bench_accelerator
    bench_accelerator.run(quick=args.quick, repeats=args.repeats,
                          burst=args.burst, out=args.out)
    return
  names = [n.strip() for n in args.impls.split(",") if n.strip()]
  unknown = set(names) - set(IMPLS)
  if unknown:
    parser.error(f"unknown --impls {sorted(unknown)}; choose from "
                 f"{list(IMPLS)}")
  selected = [] if args.features_only else cases(args.quick)
  if args.cases is not None:
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    known = [case.name for case in selected]
    missing = [n for n in wanted if n not in known]
    if missing:
      parser.error(f"unknown --cases {missing}; choose from {known}")
    selected = [case for case in selected if case.name in wanted]
  repeats = args.repeats or (5 if args.quick else 15)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for case in selected:
    print(f"running {case.name} ...", flush=True)
    results.append(run_case(case, names, case.rounds(repeats),
                            burst=args.burst))
  features, mlp = [], None
  if not args.skip_features:
    shapes = [(64, 32, 32, 64)] + ([] if args.quick else [(128, 56, 56, 64)])
    for shape in shapes:
      print(f"running Keras features {shape} ...", flush=True)
      size = math.prod(shape) * 4
      features.append(run_features(
          shape, repeats * (4 if size < 32 << 20 else 1), args.burst))
    print("running the MLP training step ...", flush=True)
    mlp = run_mlp(8192 if args.quick else 65536, repeats, args.burst)
  report = {"versions": versions(), "repeats": repeats, "burst": args.burst,
            "results": results, "features": features, "mlp": mlp}
  table = format_table(results) + "\n" + format_features(features, mlp)
  print(table)
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "bench.md"), "w") as f:
    f.write(table + "\n")
  if results:
    plot(results, os.path.join(args.out, "bench.png"))
  print(f"\nversions: {report['versions']}")
  print(f"wrote {args.out}/bench.json, bench.md"
        + (", bench.png" if results else ""))


if __name__ == "__main__":
  main()
