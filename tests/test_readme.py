"""Every Python block in README.md runs as written.

A block runs in a fresh namespace unless its first line is a comment that
starts with ``# continues``: it then runs after the blocks it continues (the
chain of blocks up to the last one that starts fresh). Blocks run in this
process: 8 simulated CPU devices (conftest), the test extras installed.
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
  """``(line, code)`` of every fenced python block, in order."""
  text = README.read_text()
  return [(text[:m.start()].count("\n") + 1, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def _chains():
  """Each block with the blocks it continues, ids by README line."""
  chains, current = [], []
  for line, code in _python_blocks():
    if not code.lstrip().startswith("# continues"):
      current = []
    current = current + [(line, code)]
    chains.append(pytest.param(list(current), id=f"README.md:{line}"))
  return chains


def test_readme_has_python_blocks():
  assert len(_python_blocks()) >= 8


# blocks for Keras 3's JAX backend run in test_keras_layer's KERAS_BACKEND=jax
# subprocess (this process's Keras has TensorFlow's backend)
KERAS_JAX_BLOCK = "# KERAS_BACKEND=jax"


def keras_jax_blocks():
  return [(line, code) for line, code in _python_blocks()
          if code.lstrip().startswith(KERAS_JAX_BLOCK)]


@pytest.mark.parametrize("chain", _chains())
def test_readme_block_runs(chain):
  if chain[-1][1].lstrip().startswith(KERAS_JAX_BLOCK):
    pytest.skip("runs in test_keras_layer's KERAS_BACKEND=jax subprocess")
  namespace = {"__name__": "readme"}
  for line, code in chain:
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
