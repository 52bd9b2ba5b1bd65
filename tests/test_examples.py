"""Every example and the notebook run end to end (offline, small settings)."""
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import default_compile_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, *args, timeout=300, default_compile=True):
  """Runs an example: at XLA's default compile settings, as users compile
  it, or at the tests' fast settings where what it shows does not depend on
  them (training runs compared with each other, a plot)."""
  env = default_compile_env() if default_compile else dict(os.environ)
  result = subprocess.run([sys.executable, str(ROOT / "examples" / script),
                           *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result.stdout


def test_demo_trains_and_saves_its_curve(tmp_path):
  out = _run("train_digits.py", "--epochs", "4", "--out",
             str(tmp_path / "c.png"))
  accuracy = float(out.split("test accuracy")[1].split()[0])
  first, last = out.split("first epoch loss")[1].split("->")
  assert float(last.split()[1]) < float(first)
  assert accuracy > 0.9
  assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize("script,args", [
    ("ghost_renorm_small_batches.py", ["--epochs", "1"]),
    ("finetune_frozen_bn.py", ["--epochs", "2"]),
    ("data_parallel_shard_map.py", ["--epochs", "1"]),
])
def test_example_runs_and_saves_a_plot(script, args, tmp_path):
  plot = tmp_path / "plot.png"
  out = _run(script, *args, "--out", str(plot), default_compile=False)
  assert "saved" in out
  assert plot.stat().st_size > 1000


@pytest.mark.parametrize("script,source", [("port_keras_model.py", "keras"),
                                           ("port_torch_cnn.py", "torch")])
def test_port_examples_have_identical_outputs(script, source, tmp_path):
  plot = tmp_path / "p.png"
  out = _run(script, "--out", str(plot))
  gaps = [line for line in out.splitlines()
          if f"max |{source} - jaxbn|" in line]
  assert len(gaps) >= 2, out
  for line in gaps:
    assert float(line.split("=")[1].split()[0]) < 1e-4, line
  assert "saved" in out and plot.stat().st_size > 1000


def test_notebook_executes(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(ROOT / "notebooks" / "tour.ipynb", as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300,
                                   kernel_name="python3",
                                   resources={"metadata": {
                                       "path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells
                    if cell.cell_type == "code" for o in cell.outputs)
  assert "identical to inference: True" in outputs
  assert any("image/png" in o.get("data", {}) for cell in notebook.cells
             if cell.cell_type == "code" for o in cell.outputs)  # inline plot
  assert not (tmp_path / "renorm_spread.png").exists()
  assert "same outputs as flax: True" in outputs
  assert "ghost batches of 4 change the outputs: True" in outputs


def test_gradient_accumulation_reproduces_the_big_batch_for_every_seed():
  # the example's conclusion, for three seeds: the accumulated run ends
  # within float32 rounding of the big-batch run, the naive one far from it
  out = _run("gradient_accumulation.py", "--epochs", "1", "--seeds", "0", "1",
             "2", default_compile=False)
  conclusions = [line for line in out.splitlines()
                 if line.startswith("conclusion")]
  assert len(conclusions) == 3, out
  for line in conclusions:
    params_gap = float(line.split("parameters within ")[1].split(",")[0])
    stats_gap = float(line.split("statistics within ")[1].split(":")[0])
    naive_gap = float(line.split("ends ")[1].split()[0])
    assert params_gap < 1e-4 and stats_gap < 1e-4, line
    assert naive_gap > 1e-2 > 100 * stats_gap, line


def test_equinox_cnn_trains_with_jaxbn_batch_norms():
  out = _run("equinox_cnn.py", "--epochs", "2", default_compile=False)
  accuracy = float(out.split("test accuracy (inference mode, moving "
                             "statistics)")[1].split()[0])
  assert accuracy > 0.9, out
