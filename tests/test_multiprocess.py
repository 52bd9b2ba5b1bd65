"""Two real JAX processes (gloo on 127.0.0.1, 4 CPU devices each) vs. one."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import cpu_kernels
from tests import multiprocess_worker as worker

WORKER = pathlib.Path(worker.__file__)
TIMEOUT_S = 240


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.long
def test_two_processes_equal_one_process(tmp_path):
  out = tmp_path / "result.npz"
  port = str(_free_port())
  # One algorithm on both sides: at this data's mean (1e3) float32 resolves
  # dgamma to ~2e-4, and the kernels' and XLA's roundings differ by that.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAXBN_CPU_KERNELS"] = "off"
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(pid), "2", port, str(out)], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for pid in (0, 1)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(
      log[-3000:] for log in logs)
  got = np.load(out)
  assert int(got["devices"]) == 8

  x, mask, dy = worker.problem()
  params, state = jaxbn.init(worker.CONFIG, x.shape)

  def f(params, x):
    y, s = jaxbn.apply(worker.CONFIG, params, state, x, training=True,
                       mask=mask)
    return jnp.sum(y * dy), (y, s)

  with cpu_kernels.use("off"):
    (_, (y, s)), (gp, gx) = jax.value_and_grad(f, argnums=(0, 1),
                                               has_aux=True)(params, x)
  np.testing.assert_allclose(got["y"], y, atol=1e-4)
  np.testing.assert_allclose(got["gx"], gx, atol=1e-4)
  # at this data's mean (1e3) float32 resolves the mean to ulp(1000) = 6e-5,
  # which moves dgamma = sum dy (x - mean) inv by |sum dy| inv 6e-5 ~ 3e-4:
  # the per-device and the one-device roundings differ by that much
  np.testing.assert_allclose(got["dgamma"], gp["gamma"], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(got["dbeta"], gp["beta"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got["moving_mean"], s["moving_mean"], rtol=1e-6)
  np.testing.assert_allclose(got["moving_variance"], s["moving_variance"],
                             rtol=1e-4)
