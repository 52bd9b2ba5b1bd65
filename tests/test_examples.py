"""Every example and the notebook run end to end (offline, small settings)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import default_compile_env

pytestmark = pytest.mark.long

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, *args, timeout=300, default_compile=True):
  """Runs an example: at XLA's default compile settings, as users compile
  it, or at the tests' fast settings where what it shows does not depend on
  them (training runs compared with each other, a plot). Either way in the
  users' modes: the kernels' default (``auto``) and the device count the
  example sets, not the test session's."""
  env = default_compile_env() if default_compile else dict(os.environ)
  env.pop("JAXBN_CPU_KERNELS", None)
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
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


def _sections(out):
  """The example's settings: for each conclusion line, the per-seed numbers
  printed above it (``name number`` pairs of each ``seed`` line) and the
  conclusion itself."""
  sections, seeds = [], []
  for line in out.splitlines():
    if line.strip().startswith("seed "):
      numbers = re.findall(r"([A-Za-z][A-Za-z .]*?) (\d\.\d{4})", line)
      seeds.append({name.strip(): float(v) for name, v in numbers})
    elif line.startswith("conclusion"):
      sections.append((seeds, line))
      seeds = []
  return sections


def _check_counts(seeds, conclusion, ours, theirs):
  """The conclusion's counts are those of the per-seed lines."""
  wins = sum(s[ours] > s[theirs] for s in seeds)
  losses = sum(s[ours] < s[theirs] for s in seeds)
  assert f"ahead in {wins} of {len(seeds)} seeds, behind in {losses}" in (
      conclusion), (seeds, conclusion)
  if wins == len(seeds):
    assert "wins for every seed" in conclusion, conclusion
  elif losses < len(seeds):  # neither side every time
    assert "mixed" in conclusion, conclusion


def test_batch_renorm_beats_plain_bn_on_non_iid_batches_for_every_seed(
    tmp_path):
  out = _run("ghost_renorm_small_batches.py", "--seeds", "0", "1", "2",
             "--out", str(tmp_path / "plot.png"), default_compile=False)
  (non_iid, renorm_conclusion), (large, ghost_conclusion) = _sections(out)
  assert len(non_iid) == len(large) == 3, out
  for seed in non_iid:  # the claim: Batch Renorm ahead, by a margin
    assert seed["Batch Renorm"] > seed["plain BN"] + 0.005, out
  _check_counts(non_iid, renorm_conclusion, "Batch Renorm", "plain BN")
  # Ghost BN vs plain BN at 256: whatever the seeds show, said as it is
  _check_counts(large, ghost_conclusion, "Ghost BN", "plain BN")
  assert (tmp_path / "plot.png").stat().st_size > 1000


def test_synced_bn_beats_local_bn_on_small_shards_for_every_seed(tmp_path):
  out = _run("data_parallel_shard_map.py", "--seeds", "0", "1", "2", "--out",
             str(tmp_path / "plot.png"), default_compile=False)
  assert out.startswith("4 devices, 2 examples per device"), out
  [(seeds, conclusion)] = _sections(out)
  assert len(seeds) == 3, out
  for seed in seeds:
    assert seed["synced BN"] > seed["local BN"] + 0.02, out
  _check_counts(seeds, conclusion, "synced BN", "local BN")
  assert (tmp_path / "plot.png").stat().st_size > 1000


def test_frozen_bn_beats_bn_training_on_tiny_fine_tuning_batches(tmp_path):
  out = _run("finetune_frozen_bn.py", "--seeds", "0", "1", "2", "--out",
             str(tmp_path / "plot.png"), default_compile=False)
  (tiny, tiny_conclusion), (eight, eight_conclusion) = _sections(out)
  assert len(tiny) == len(eight) == 3, out
  for seed in tiny:  # batches of 2: training-mode BN loses what it had
    assert seed["frozen BN"] > seed["BN training"], out
    assert seed["BN training"] < seed["pretrained"], out
  # frozen BN in inference mode leaves the pretrained statistics as they were
  drifts = re.findall(r"frozen BN \d\.\d{4} \(moving_mean drift (\S+)\)",
                      out)
  assert drifts == ["0.00"] * 6, out
  _check_counts(tiny, tiny_conclusion, "frozen BN", "BN training")
  _check_counts(eight, eight_conclusion, "frozen BN", "BN training")
  assert (tmp_path / "plot.png").stat().st_size > 1000


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
