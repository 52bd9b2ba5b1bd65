"""``python -m jaxbn.info``: versions, devices, and whether the CPU kernels
are built, registered and used (and why not).

  python -m jaxbn.info
"""
from __future__ import annotations

import importlib
import platform


# one line per mode value (jaxbn.modes documents them in full)
STATISTICS_MEANING = {
    "auto": "JAXBN_STATISTICS: the CPU algorithm on CPU, the one-read GPU/TPU "
            "algorithm there, chosen when a program is lowered",
    "accelerator": "JAXBN_STATISTICS: the GPU/TPU algorithm everywhere, CPU "
                   "included, no kernel",
    "cpu": "JAXBN_STATISTICS: the CPU algorithm fixed at trace time; programs "
           "for CPU only",
}
KERNEL_MEANING = {
    "auto": "JAXBN_CPU_KERNELS: the C++ kernels where the process sees one "
            "device",
    "on": "JAXBN_CPU_KERNELS: the kernels wherever they apply",
    "off": "JAXBN_CPU_KERNELS: XLA only",
}
GUARD_MEANING = {
    "on": "JAXBN_OVERFLOW_GUARD: channels spread beyond 2^30 measured in units "
          "of a power of two",
    "off": "JAXBN_OVERFLOW_GUARD: no units; a spread beyond about 1e18 "
           "overflows",
}


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
  out["statistics mode"] = (f"{modes.statistics.value} "
                            f"({STATISTICS_MEANING[modes.statistics.value]})")
  out["kernel mode"] = (f"{cpu_kernels.get_mode()} "
                        f"({KERNEL_MEANING[cpu_kernels.get_mode()]})")
  out["overflow guard"] = (f"{modes.overflow_guard.value} "
                           f"({GUARD_MEANING[modes.overflow_guard.value]})")
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


def main(argv=None):
  import argparse
  argparse.ArgumentParser(
      prog="python -m jaxbn.info",
      description="Prints jaxbn's versions, devices, modes (each with its "
                  "meaning and environment variable) and whether the CPU "
                  "kernels are built, registered and used, and why not."
  ).parse_args(argv)
  for key, value in report().items():
    print(f"{key:>38}: {value}")


if __name__ == "__main__":
  main()
