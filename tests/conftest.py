"""Test setup: 8 simulated CPU devices, quiet TensorFlow, legacy Keras.

The CPU kernels are switched on for every test (their default, 'auto', would
leave them off with 8 devices): every test of the fast path then runs them;
tests of the XLA formulation ask for ``cpu_kernels.use('off')``.
"""
import gc
import os

# A test process holds millions of long-lived objects (TensorFlow, PyTorch,
# JAX, and the jaxprs and executables of thousands of traced programs), and
# at CPython's default thresholds full collections, which walk all of them,
# come dozens of times in a worker's life. Young collections every 50,000
# net allocations instead of 700, and the older generations correspondingly
# rarer: what reference counting frees is freed as before, cyclic garbage
# waits longer, and the workers' peak memory is the same (CHANGELOG has the
# counts and times).
gc.set_threshold(50_000, 20, 100)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAXBN_CPU_KERNELS", "on")

# The test processes compile faster than users' processes do: LLVM's
# optimizations off, XLA:CPU's older fusion code generator instead of its
# MLIR fusion emitters, and each program's machine code generated as one
# module (the split into modules compiled on parallel threads costs time
# where the test workers already keep every core busy); together they cut
# the suite's compile time by more than half. Nothing the tests check
# depends on them: XLA:CPU keeps IEEE semantics either way (no fast-math),
# the HLO that the byte and memory tests read is built before code
# generation, and the whole suite passes at the default settings too
# (``JAXBN_TEST_COMPILE=default`` runs it so). At those default settings, as
# users compile: the README's demo and the Keras and PyTorch ports (in
# subprocesses, default_compile_env: end-to-end trained numbers) and the
# numerics of non-finite and extreme data
# (test_statistics::test_extremes_hold_at_the_default_compile_settings); the
# examples that compare training runs with each other and the benchmark's
# smoke test run at the fast settings (test_examples._run, test_bench).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_cpu_use_fusion_emitters=false",
                      "--xla_cpu_parallel_codegen_split_count=1")
if os.environ.get("JAXBN_TEST_COMPILE", "fast") == "fast":
  for _flag in FAST_COMPILE_FLAGS:
    if _flag not in os.environ["XLA_FLAGS"].split():
      os.environ["XLA_FLAGS"] += " " + _flag


def default_compile_env() -> dict:
  """This process's environment with XLA's default compile settings."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      f for f in env["XLA_FLAGS"].split() if f not in FAST_COMPILE_FLAGS)
  env["JAXBN_TEST_COMPILE"] = "default"
  return env

# One compilation cache for the session, its xdist workers and the example
# subprocesses: many tests compile the same programs (each hypothesis example,
# each jit of a fresh closure); XLA keys the cache by the program, so a hit
# is the same executable. Created empty per session (a stale cache is never
# read), removed at the end by the process that made it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="jaxbn-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import hypothesis  # noqa: E402

# statistics_mode (below) holds for a whole test, every example included
_FIXTURE_OK = [hypothesis.HealthCheck.function_scoped_fixture]
hypothesis.settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True,
    suppress_health_check=_FIXTURE_OK)
hypothesis.settings.register_profile(
    "long", max_examples=2000, deadline=None,
    suppress_health_check=_FIXTURE_OK)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


def pytest_sessionfinish(session):
  # an xdist worker hands its share of the oracle's tally to the controller
  workeroutput = getattr(session.config, "workeroutput", None)
  if workeroutput is not None:
    from tests import keras_oracle
    workeroutput["keras_oracle_tally"] = dict(keras_oracle.TALLY)
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  # tests marked default_compile run in a subprocess at XLA's default compile
  # settings (test_statistics::test_extremes_hold_at_the_default_compile_
  # settings), not twice: a process at the fast settings deselects them
  if os.environ.get("JAXBN_TEST_COMPILE", "fast") == "fast":
    elsewhere = [i for i in items if i.get_closest_marker("default_compile")]
    if elsewhere:
      config.hook.pytest_deselected(items=elsewhere)
      items[:] = [i for i in items if i not in elsewhere]
  # the tests that take seconds (marked long) first: xdist hands out tests in
  # this order, so the workers' last tests are short ones and they finish
  # together instead of one waiting for the other's subprocess
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  from tests import keras_oracle
  share = getattr(node, "workeroutput", {}).get("keras_oracle_tally", {})
  for key, value in share.items():
    keras_oracle.TALLY[key] += value


def pytest_terminal_summary(terminalreporter):
  from tests import keras_oracle
  tally = keras_oracle.TALLY
  if tally["configs"]:
    terminalreporter.write_line(
        f"tf_keras oracle: {tally['configs']} configurations, "
        f"{tally['checks']} quantity comparisons (outputs, gradients, every "
        "state variable per step, inference), all within 2e-4")


@pytest.fixture(autouse=True)
def cpu_programs(request):
  """Every test traces CPU programs (statistics mode ``'cpu'``: the CPU
  algorithm chosen at trace time, the GPU/TPU one not traced beside it),
  except in modules that lower for GPU/TPU (``LOWERS_FOR_ACCELERATORS =
  True``). XLA compiles the same program either way:
  ``test_modes::test_cpu_mode_compiles_the_program_of_the_default_mode``
  checks it, so these tests check the default program while tracing about
  a third less."""
  from jaxbn import modes
  if getattr(request.module, "LOWERS_FOR_ACCELERATORS", False):
    yield
    return
  with modes.statistics("cpu"):
    yield


@pytest.fixture(params=["cpu", "accelerator"])
def statistics_mode(request):
  """Runs a test under each statistics algorithm: the CPU one (kernels or
  two passes here; see :func:`cpu_programs`) and the GPU/TPU one
  (``JAXBN_STATISTICS=accelerator``), so the path TPU users run is tested
  on every commit. Modules opt in with
  ``pytestmark = pytest.mark.usefixtures("statistics_mode")``."""
  from jaxbn import modes
  with modes.statistics(request.param):
    yield request.param


@pytest.fixture(autouse=True)
def overflow_guard(request):
  """The overflow guard (``jaxbn.modes.overflow_guard``) for each test: on,
  as in the product, except in modules that declare ``ORDINARY_DATA =
  True`` and tests marked ``ordinary_data``: their data never reach the
  guard's retake, so its ``lax.cond`` only doubles the compile time of their
  programs. There
  ``test_closed_form::test_the_overflow_guard_changes_no_number_of_ordinary_data``
  checks, feature by feature on every path, that the guard changes no
  number of ordinary data (beyond float32 rounding), so those tests check
  the default program's numbers too. The numerics (``test_statistics``),
  distributed, export and reliability modules, the README, examples and
  benchmark run with it on."""
  from jaxbn import modes
  ordinary = (getattr(request.module, "ORDINARY_DATA", False)
              or request.node.get_closest_marker("ordinary_data") is not None)
  with modes.overflow_guard("off" if ordinary else "on"):
    yield
