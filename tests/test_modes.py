"""The trace-time switches: thread-local and part of JAX's jit cache key."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import cpu_kernels, modes

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="CPU kernels not built")
CONFIG = jaxbn.BatchNormConfig()


def _train(params, state, x):
  return jaxbn.apply(CONFIG, params, state, x, training=True)


def _uses_kernel(fn, *args):
  return "jaxbn_moments" in fn.lower(*args).as_text()


@needs_kernels
def test_threads_tracing_under_different_modes_get_their_own():
  x = jnp.ones((8, 4))
  params, state = jaxbn.init(CONFIG, x.shape)
  results, errors = {}, []

  def trace(i):
    mode = "on" if i % 2 else "off"
    try:
      with cpu_kernels.use(mode):
        for _ in range(3):  # new jit objects of one function, many times
          results.setdefault(i, []).append(
              _uses_kernel(jax.jit(_train), params, state, x))
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=trace, args=(i,)) for i in range(40)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert all(all(r) == bool(i % 2) and any(r) == bool(i % 2)
             for i, r in results.items()), results


@needs_kernels
def test_the_mode_is_part_of_the_jit_cache_key():
  x = jnp.ones((8, 4))
  params, state = jaxbn.init(CONFIG, x.shape)
  step = jax.jit(_train)
  with cpu_kernels.use("on"):
    assert _uses_kernel(step, params, state, x)
    on = step(params, state, x)
  with cpu_kernels.use("off"):
    # the same jitted function, and a new jit of the same Python function
    assert not _uses_kernel(step, params, state, x)
    assert not _uses_kernel(jax.jit(_train), params, state, x)
    off = step(params, state, x)
  for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
    assert jnp.allclose(a, b, atol=1e-6)
  # a compiled object keeps its program whatever the mode
  with cpu_kernels.use("on"):
    compiled = step.lower(params, state, x).compile()
  with cpu_kernels.use("off"):
    compiled(params, state, x)
    assert "jaxbn_moments" in compiled.as_text()


def test_statistics_mode_and_bad_values():
  assert modes.statistics.value in modes.STATISTICS_MODES
  with modes.statistics("accelerator"):
    assert modes.statistics.value == "accelerator"
    with cpu_kernels.use("on"):  # no kernel under the accelerator switch
      assert cpu_kernels.applicable(jnp.ones((8, 4)), (0,)) is None
  with pytest.raises(ValueError, match="'fast'"):
    cpu_kernels.use("fast").__enter__()


def test_environment_variables_are_validated(tmp_path):
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, "-c", "import jaxbn"], capture_output=True, text=True,
      env={"JAXBN_STATISTICS": "gpu", "JAX_PLATFORMS": "cpu", "PATH": ""},
      timeout=120)
  assert result.returncode != 0
  assert "JAXBN_STATISTICS must be one of" in result.stderr


def _compiled_program(config, x, mask=None, axis_name=None):
  """The optimized HLO of a training step (gradients with respect to the
  parameters and x), without source locations."""
  import re
  params, state = jaxbn.init(config, x.shape)

  def step(p, x):
    def loss(p, x):
      y, new_state = jaxbn.apply(config, p, state, x, training=True,
                                 mask=mask, axis_name=axis_name)
      return jnp.sum(jnp.sin(y)), new_state
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)

  if axis_name is not None:
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(jax.devices()[:4], (axis_name,))
    step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(axis_name)),
                         out_specs=((P(), P(axis_name)), P()))
  text = jax.jit(step).lower(params, x).compile().as_text()
  lines = [line for line in text.splitlines() if not re.match(
      r"(\d+ |FileNames|FunctionNames|FileLocations|StackFrames)", line)]
  return re.sub(r", (metadata=\{[^}]*\}|stack_frame_id=\d+)", "",
                "\n".join(lines))


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_cpu_mode_compiles_the_program_of_the_default_mode(kernels):
  # The statistics mode 'cpu' picks at trace time the branch that the
  # default's lax.platform_dependent picks when lowering for CPU: XLA gets
  # the same program (the test suite traces in 'cpu' mode, see conftest).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4, 4, 16)), jnp.float32)
  cases = [
      (jaxbn.BatchNormConfig(), x, {}),
      (jaxbn.BatchNormConfig(renorm=True, virtual_batch_size=4,
                             activation="relu"), x, {}),
      (jaxbn.BatchNormConfig(), x[:, 0, 0], {"mask": jnp.arange(8) < 5}),
      (jaxbn.BatchNormConfig(), x, {"axis_name": "data"}),
  ]
  with cpu_kernels.use(kernels):
    for config, data, extra in cases:
      with modes.statistics("auto"):
        default = _compiled_program(config, data, **extra)
      with modes.statistics("cpu"):
        traced_for_cpu = _compiled_program(config, data, **extra)
      assert traced_for_cpu == default, (config, extra)
      assert "conditional" in default  # the overflow guard's, on CPU
  with modes.statistics("cpu"):
    assert modes.statistics.value == "cpu"


def test_info_shows_every_mode_with_its_meaning_and_answers_help(capsys):
  from jaxbn import info
  report = info.report()
  for key, variable in (("statistics mode", "JAXBN_STATISTICS"),
                        ("kernel mode", "JAXBN_CPU_KERNELS"),
                        ("overflow guard", "JAXBN_OVERFLOW_GUARD")):
    assert variable in report[key], report[key]
  with modes.statistics("accelerator"):
    assert info.report()["statistics mode"].startswith("accelerator (")
  with pytest.raises(SystemExit) as done:
    info.main(["--help"])
  assert done.value.code == 0
  assert "modes" in capsys.readouterr().out


def test_import_prints_nothing_and_leaves_flax_nnx_to_its_users():
  # jaxbn.nnx (and flax.nnx, a third of jaxbn's import time) load on first
  # use of jaxbn.nnx; then its layers are jaxbn's NNX layers
  import subprocess
  import sys
  env = {"PATH": "", "JAX_PLATFORMS": "cpu", "HOME": "/tmp"}
  code = ("import sys, jaxbn; assert 'flax.nnx' not in sys.modules; "
          "from jaxbn.tools import precise; assert precise._nnx_layers() == (); "
          "assert jaxbn.nnx.BatchNormalization.__module__ == 'jaxbn.nnx'; "
          "assert len(precise._nnx_layers()) == 2")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "" and result.stderr == "", result.stderr
