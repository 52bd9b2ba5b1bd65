"""Test setup: 8 simulated CPU devices, quiet TensorFlow, legacy Keras.

The CPU kernels are switched on for every test (their default, 'auto', would
leave them off with 8 devices): every test of the fast path then runs them;
tests of the XLA formulation ask for ``cpu_kernels.use('off')``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAXBN_CPU_KERNELS", "on")

import hypothesis  # noqa: E402

# statistics_mode (below) holds for a whole test, every example included
_FIXTURE_OK = [hypothesis.HealthCheck.function_scoped_fixture]
hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=_FIXTURE_OK)
hypothesis.settings.register_profile(
    "long", max_examples=2000, deadline=None,
    suppress_health_check=_FIXTURE_OK)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter):
  from tests import keras_oracle
  tally = keras_oracle.TALLY
  if tally["configs"]:
    terminalreporter.write_line(
        f"tf_keras oracle: {tally['configs']} configurations, "
        f"{tally['checks']} quantity comparisons (outputs, gradients, every "
        "state variable per step, inference), all within 2e-4")


import pytest  # noqa: E402


@pytest.fixture(params=["auto", "accelerator"])
def statistics_mode(request):
  """Runs a test under each statistics algorithm: the default (CPU kernels
  or two passes here) and the GPU/TPU one (``JAXBN_STATISTICS=accelerator``),
  so the path TPU users run is tested on every commit. Modules opt in with
  ``pytestmark = pytest.mark.usefixtures("statistics_mode")``."""
  from jaxbn import modes
  with modes.statistics(request.param):
    yield request.param
