"""Builds jaxbn's optional CPU kernels (an XLA FFI extension).

Everything else is declared in pyproject.toml. The extension needs a C++17
compiler and the XLA FFI headers that ship with jaxlib; when either is
missing the build prints why and jaxbn runs all of its statistics in XLA.
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:  # setuptools >= 70.1 (pyproject asks for 77 in isolated builds)
  from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # an older setuptools without build isolation
  bdist_wheel = None


def _jaxlib_include() -> str:
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(list(spec.submodule_search_locations)[0], "include")


def _jaxlib_version() -> str:
  try:
    from importlib.metadata import version
    return version("jaxlib")
  except Exception:  # noqa: BLE001 - recorded for messages only
    return "unknown"


class OptionalBuildExt(build_ext):
  """Builds the kernels if it can; never fails the install."""

  def run(self):
    # Always compile: an in-tree build/ directory from an install against
    # another jaxlib would otherwise be reused as "up to date".
    self.force = True
    self.distribution.jaxbn_kernels_built = False
    include = _jaxlib_include()
    if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
      print("jaxbn: jaxlib's XLA FFI headers not found; skipping the CPU "
            "kernels (statistics run in XLA).", file=sys.stderr)
      return
    version = _jaxlib_version()
    for ext in self.extensions:
      ext.include_dirs.append(include)
      ext.define_macros.append(("JAXBN_BUILT_WITH_JAXLIB", f'"{version}"'))
    try:
      super().run()
    except Exception as err:  # noqa: BLE001 - any compiler failure
      print(f"jaxbn: building the CPU kernels failed ({err}); statistics "
            "run in XLA.", file=sys.stderr)
      return
    self.distribution.jaxbn_kernels_built = True


commands = {"build_ext": OptionalBuildExt}
if bdist_wheel is not None:

  class Wheel(bdist_wheel):
    """Tags the wheel pure Python (py3-none-any) when no kernel was built."""

    def get_tag(self):
      if not getattr(self.distribution, "jaxbn_kernels_built", True):
        self.root_is_pure = True
        return "py3", "none", "any"
      return super().get_tag()

  commands["bdist_wheel"] = Wheel


setup(
    ext_modules=[
        Extension(
            "jaxbn._cpu_kernels",
            sources=["jaxbn/csrc/kernels.cc", "jaxbn/csrc/python_module.cc"],
            language="c++",
            # -g0 and -s: no debug information (it was 90% of the file)
            extra_compile_args=["-O3", "-g0", "-std=c++17",
                                "-fvisibility=hidden", "-ffp-contract=off",
                                "-Wno-attributes", "-Wno-return-type"],
            extra_link_args=["-s"],
        )
    ],
    cmdclass=commands,
)
