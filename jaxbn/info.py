"""``python -m jaxbn.info``: versions, devices, and whether the CPU kernels
are built, registered and used (and why not).

  python -m jaxbn.info
"""
from __future__ import annotations

import importlib
import platform


def report() -> dict:
  """Everything ``python -m jaxbn.info`` prints, as a dict."""
  import jax
  import jax.numpy as jnp
  import jaxbn
  from jaxbn import cpu_kernels, modes
  out = {"python": platform.python_version(), "jaxbn": jaxbn.__version__}
  for name in ("jax", "jaxlib", "flax", "optax", "chex"):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001 - report, do not fail
      out[name] = f"not importable ({type(err).__name__})"
  out["backend"] = jax.default_backend()
  out["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  out["statistics mode"] = modes.statistics.value
  out["kernel mode"] = cpu_kernels.get_mode()
  try:
    from jaxbn import _cpu_kernels as built
    out["kernels built"] = (f"yes, against XLA FFI API "
                            f"{'.'.join(map(str, built.build_info()['ffi_api']))}"
                            f" (jaxlib {built.build_info()['jaxlib']})")
  except ImportError:
    out["kernels built"] = ("no: no C++ compiler (or no jaxlib headers) at "
                            "install time; reinstall with one to get them")
  if cpu_kernels.available():
    out["kernels registered"] = "yes"
  elif cpu_kernels.NOT_REGISTERED:
    out["kernels registered"] = f"no: {cpu_kernels.NOT_REGISTERED}"
  else:
    out["kernels registered"] = "no: not built"
  x = jnp.ones((8, 4), jnp.float32)
  view = cpu_kernels.applicable(x, (0,))
  if view is None:
    reasons = []
    if not cpu_kernels.available():
      reasons.append("not registered")
    if cpu_kernels.get_mode() == "off":
      reasons.append("mode 'off'")
    if cpu_kernels.get_mode() == "auto" and jax.device_count() != 1:
      reasons.append(f"mode 'auto' with {jax.device_count()} devices (use "
                     "'on' under shard_map/pmap)")
    if modes.statistics.value == "accelerator":
      reasons.append("JAXBN_STATISTICS=accelerator")
    out["kernels used for float32 NHWC on CPU"] = (
        "no: " + ", ".join(reasons or ["not this input"]))
  else:
    out["kernels used for float32 NHWC on CPU"] = (
        "yes" if jax.default_backend() == "cpu" else
        "no: the default backend is not the CPU")
  return out


def main():
  for key, value in report().items():
    print(f"{key:>38}: {value}")


if __name__ == "__main__":
  main()
