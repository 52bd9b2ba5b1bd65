"""``jax.export`` of a training step: default mode, every platform, served by
a process that never imports jaxbn; and what GPU/TPU would run, lowered here
(no hardware needed): no jaxbn custom call, the statistics in one read."""
import pickle
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import cpu_kernels, modes

# lowers for GPU/TPU: programs keep every platform's algorithm (conftest)
LOWERS_FOR_ACCELERATORS = True


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = jaxbn.BatchNormalization(momentum=0.9, renorm=True)(x, training=True)
    x = jaxbn.BatchNormalization(virtual_batch_size=4, activation="relu")(
        nn.relu(x), training=True)
    return jnp.mean(jnp.sin(x))


def _step(params, stats, x):
  def loss(p):
    return Net().apply({"params": p, "batch_stats": stats}, x,
                       mutable=["batch_stats"])
  (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, grads, updates["batch_stats"]


def _problem():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 3)) * 3 + 2
  variables = Net().init(jax.random.PRNGKey(1), x)
  return variables["params"], variables["batch_stats"], x


SERVE = """
import pickle, sys
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
args = pickle.load(open(sys.argv[2], "rb"))
out = jax.tree.map(np.asarray, exported.call(*args))
pickle.dump((out, "jaxbn" in sys.modules), open(sys.argv[3], "wb"))
"""


@pytest.mark.parametrize("platforms", [("cpu",), ("cpu", "cuda", "tpu")])
def test_training_step_exports_and_serves_without_jaxbn(platforms, tmp_path):
  params, stats, x = _problem()
  with cpu_kernels.use("on"):  # the live step runs the kernels ...
    live = jax.jit(_step)(params, stats, x)
    assert "jaxbn_" in jax.jit(_step).lower(params, stats, x).as_text()
    # ... the exported one, in the default mode, runs XLA
    exported = jax.export.export(jax.jit(_step), platforms=platforms)(
        params, stats, x)
  assert not any(t.startswith("jaxbn") for t in _custom_call_targets(
      exported.mlir_module()))
  (tmp_path / "step.bin").write_bytes(exported.serialize())
  with open(tmp_path / "args.pkl", "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, (params, stats, x)), f)
  (tmp_path / "serve.py").write_text(SERVE)
  subprocess.run([sys.executable, str(tmp_path / "serve.py"),
                  str(tmp_path / "step.bin"), str(tmp_path / "args.pkl"),
                  str(tmp_path / "out.pkl")], check=True, cwd=tmp_path,
                 env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
  with open(tmp_path / "out.pkl", "rb") as f:
    served, imported_jaxbn = pickle.load(f)
  assert not imported_jaxbn
  for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(live)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def _custom_call_targets(module_text):
  return set(re.findall(r"stablehlo\.custom_call @([\w.]+)", module_text)
             + re.findall(r'call_target_name = "([^"]+)"', module_text))


def _full_size_reductions(module_text, shape):
  """The reduce ops over a ``shape`` operand, each with the SSA names of its
  ancestors (within the function that holds it)."""
  full = "tensor<" + "x".join(str(d) for d in shape) + "xf32>"
  defs, reduces = {}, []
  for line in module_text.splitlines():
    m = re.match(r"\s*(%[\w#]+)(?::\d+)? = (.*)", line)
    if not m:
      continue
    name, rest = m.group(1), m.group(2)
    operands = re.findall(r"%[\w]+", rest.split(" : ")[0])
    defs[name] = operands
    if rest.startswith("stablehlo.reduce(") and full in rest.split(" : ")[-1]:
      reduces.append(name)

  def ancestors(name, seen=None):
    seen = set() if seen is None else seen
    for op in defs.get(name, ()):
      op = op.split("#")[0]
      if op not in seen:
        seen.add(op)
        ancestors(op, seen)
    return seen

  return {r: ancestors(r) for r in reduces}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_and_tpu_statistics_read_x_once_without_custom_calls(platform):
  config = jaxbn.BatchNormConfig()
  shape = (8, 4, 4, 16)
  params, state = jaxbn.init(config, shape)
  forward = jax.jit(lambda p, s, x: jaxbn.apply(config, p, s, x,
                                                training=True))
  texts = {}
  for guard in ("off", "on"):
    with cpu_kernels.use("on"), modes.overflow_guard(guard):
      texts[guard] = jax.export.export(forward, platforms=(platform,))(
          params, state, jnp.ones(shape)).mlir_module()
  for text in texts.values():
    assert not any(t.startswith("jaxbn") for t in _custom_call_targets(text))
  # the program ordinary data run:
  reductions = _full_size_reductions(texts["off"], shape)
  assert len(reductions) == 2, reductions  # S1 and S2 of the shifted sums
  # siblings: neither depends on the other (a two-pass mean would)
  (a, anc_a), (b, anc_b) = reductions.items()
  assert a not in anc_b and b not in anc_a
  # with the guard on, the statistics are the scaled sums: five siblings
  # of one read and no retake (the one region is lax.platform_dependent's,
  # chosen by a constant: test_accelerator_program)
  regions = _reductions_by_region(texts["on"], shape)
  assert [sorted(r) for r in regions.values()] == [["add"] * 5], regions
  guarded = _full_size_reductions(texts["on"], shape)
  assert not any(a in guarded[b] for a in guarded for b in guarded)


def _reductions_by_region(module_text, shape):
  """The kinds (add, maximum) of the reduce ops over a ``shape`` operand,
  grouped by the top-level ``stablehlo.case`` (a cond) that holds them."""
  full = "tensor<" + "x".join(str(d) for d in shape) + "xf32>"
  regions, region = {}, None
  for line in module_text.splitlines():
    indent = len(line) - len(line.lstrip())
    if indent <= 4 and line.lstrip().startswith("%"):  # a top-level op
      region = (line.split("=")[0].strip() if "stablehlo.case" in line
                else None)
    m = re.search(r"stablehlo\.reduce\(.*applies stablehlo\.(\w+)", line)
    if m and full in line.split(" : ")[-1]:
      regions.setdefault(region, []).append(m.group(1))
  return regions


@pytest.mark.parametrize("size", [1, 3])
def test_exported_kernel_fallbacks_batch_under_vmap(size):
  # the kernels' XLA stand-ins see one problem each, vmapped like the calls
  config = jaxbn.BatchNormConfig(virtual_batch_size=4)
  x = jax.random.normal(jax.random.PRNGKey(2), (size, 8, 3, 5)) + 4
  params, state = jaxbn.init(config, x.shape[1:])
  mask = jnp.arange(8)[:, None, None] % 3 != 0

  def step(x):
    f = lambda x: jnp.sum(jnp.sin(jaxbn.apply(
        config, params, state, x, training=True, mask=mask)[0]))
    return jax.vmap(jax.value_and_grad(f))(x)

  with cpu_kernels.use("on"):
    live = jax.jit(step)(x)
    exported = jax.export.export(jax.jit(step), platforms=("cpu",))(x)
  assert not any(t.startswith("jaxbn") for t in _custom_call_targets(
      exported.mlir_module()))
  for a, b in zip(jax.tree.leaves(exported.call(x)), jax.tree.leaves(live)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_exported_statistics_keep_the_live_accuracy(masked):
  # the kernels' stand-in in an exported program is the XLA path's corrected
  # two-pass, not a plain float32 two-pass (1.8e-3 off at mean 1e6, std 1)
  config = jaxbn.BatchNormConfig(momentum=0.0,
                                 moving_variance_estimator="biased")
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((64, 4, 4, 8)) + 1e6).astype(np.float32)
  mask = (np.arange(64) % 3 != 0)[:, None, None, None] if masked else None
  params, state = jaxbn.init(config, x.shape)
  step = jax.jit(lambda x: jaxbn.apply(config, params, state, x,
                                       training=True, mask=mask)[1])
  with cpu_kernels.use("on"):
    assert "jaxbn_moments" in step.lower(x).as_text()
    live = step(x)
    exported = jax.export.export(step, platforms=("cpu",))(x)
  assert not any(t.startswith("jaxbn") for t in _custom_call_targets(
      exported.mlir_module()))
  served = exported.call(x)
  valid = x.astype(np.float64)[np.ones(64, bool) if mask is None
                               else mask.ravel()].reshape(-1, 8)
  for state_now in (live, served):
    np.testing.assert_allclose(state_now["moving_variance"], valid.var(0),
                               rtol=1e-4)
    np.testing.assert_allclose(state_now["moving_mean"], valid.mean(0),
                               rtol=1e-7)
