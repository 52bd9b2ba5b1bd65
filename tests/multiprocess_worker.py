"""One process of the two-process test (run by test_multiprocess.py).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import jaxbn  # noqa: E402


def problem():
  """The global batch; both processes and the test build the same one."""
  rng = np.random.RandomState(7)
  x = (rng.randn(64, 5) * 2 + 1e3).astype(np.float32)
  mask = rng.rand(64, 1) > 0.25
  mask[40:48] = False  # one device of the second process is empty
  dy = (rng.randn(64, 5) * mask).astype(np.float32)
  return x, mask, dy


CONFIG = jaxbn.BatchNormConfig(momentum=0.5)


def main():
  pid, nproc, port, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                           sys.argv[4])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  x, mask, dy = problem()
  rows = slice(pid * 64 // nproc, (pid + 1) * 64 // nproc)
  put = lambda a: jax.make_array_from_process_local_data(sharding, a[rows])
  params, state = jaxbn.init(CONFIG, x.shape)

  def local(params, state, x, mask, dy):
    def f(params, x):
      y, s = jaxbn.apply(CONFIG, params, state, x, training=True,
                         axis_name="data", mask=mask)
      return jax.lax.psum(jnp.sum(y * dy), "data"), (y, s)
    (_, (y, s)), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        params, x)
    return y, s, g

  step = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P("data")),
      out_specs=(P("data"), P(), (P(), P("data")))))
  y, s, (gp, gx) = step(params, state, put(x), put(mask), put(dy))
  gathered = multihost_utils.process_allgather({"y": y, "gx": gx},
                                               tiled=True)
  if pid == 0:
    np.savez(out, y=np.asarray(gathered["y"]), gx=np.asarray(gathered["gx"]),
             dgamma=np.asarray(gp["gamma"]), dbeta=np.asarray(gp["beta"]),
             moving_mean=np.asarray(s["moving_mean"]),
             moving_variance=np.asarray(s["moving_variance"]),
             devices=jax.device_count())
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
