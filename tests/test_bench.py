"""The benchmark runs end to end (a smoke test: tiny settings, no timing claims)."""
import json
import os
import subprocess
import sys

import pytest

from jaxbn import bench


@pytest.mark.long
def test_bench_quick_writes_table_json_and_chart(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "jaxbn.bench", "--quick", "--repeats", "1",
       "--burst", "1", "--skip-features", "--impls", "jaxbn,flax.linen",
       "--cases", "in-cache NHWC float32",
       "--out", str(tmp_path)],
      # the tests' fast compile settings: a smoke test claims no timing
      capture_output=True, text=True, timeout=600, env=dict(os.environ))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "bench.json").read_text())
  tunables = report["versions"]["GLIBC_TUNABLES"].split(":")
  assert set(bench._MALLOC_TUNABLES) <= set(tunables)
  first = report["results"][0]
  assert set(first["modes"]["fwd+bwd"]) == {"elementwise", "jaxbn",
                                            "flax.linen"}
  assert first["xla"]["jaxbn"]["fwd+bwd"]["bytes_accessed_x_input"] <= 10.2
  assert [r["case"]["name"] for r in report["results"]] == [
      "in-cache NHWC float32"]
  assert "| jaxbn |" in (tmp_path / "bench.md").read_text()
  assert (tmp_path / "bench.png").stat().st_size > 1000


def test_cases_under_32_mb_get_four_times_the_rounds():
  by_name = {case.name: case for case in bench.cases(quick=False)}
  dram = by_name["DRAM NHWC float32"]
  assert dram.nbytes == 128 * 56 * 56 * 64 * 4 and dram.rounds(15) == 15
  assert by_name["DRAM NHWC bfloat16"].nbytes == dram.nbytes // 2
  assert by_name["DRAM NHWC bfloat16"].rounds(15) == 15  # 51 MB
  for name in ("in-cache NHWC float32", "in-cache NHWC bfloat16",
               "wide NHWC float32"):
    assert by_name[name].nbytes < 32 << 20
    assert by_name[name].rounds(15) == 60


def test_feature_and_mlp_cases_report_ratios_and_bytes():
  # the --features-only cases, in this process at a tiny size
  features = bench.run_features((16, 8, 8, 32), repeats=1, burst=1)
  assert set(features["x_plain_jaxbn"]) == (set(bench.feature_configs())
                                            | {"flax.linen (plain)"})
  for name, analysis in features["xla"].items():
    # 8 input-sized transfers, plus per-channel vectors and a mask's row
    # weights, not negligible at this size (test_closed_form checks 8.1)
    assert analysis["bytes_accessed_x_input"] <= 8.5, name
  mlp = bench.run_mlp(256, repeats=1, burst=1)
  zoo = "jaxbn via replace_batch_norm (the flax.linen model)"
  assert set(mlp["step_over_flax"]) == {"jaxbn (activation='relu')",
                                        "jaxbn, then nn.relu", zoo}
  table = bench.format_features([features], mlp)
  assert "| adjustment |" in table and "| jaxbn, then nn.relu |" in table
  assert f"| {zoo} |" in table


@pytest.mark.long
def test_accelerator_suite_runs_layers_and_networks(tmp_path):
  # the GPU/TPU suite (the default on those devices), at its tiny sizes
  from jaxbn import bench_accelerator
  report = bench_accelerator.run(quick=True, repeats=1, burst=1,
                                 out=str(tmp_path))
  assert {r["dtype"] for r in report["layers"]} == {"float32", "bfloat16"}
  for row in report["layers"] + report["networks"]:
    assert set(row["median_ms"]) >= {"jaxbn", "flax.linen"}
    assert row["jaxbn_over_flax"] == (row["median_ms"]["jaxbn"]
                                      / row["median_ms"]["flax.linen"])
  assert all(r["batch_norms"] >= 20 for r in report["networks"])
  # the compiled training steps' temp memory and conditionals, each case in
  # both dtypes, and flax's (here the CPU program: the guard's one cond)
  memory = report["memory"]
  assert len(memory) == 2 * (len(bench_accelerator.MEMORY_CASES) + 1)
  for row in memory:
    assert 0 <= row["temp_over_input"] < 5 and row["conditionals"] >= 0
  assert {r["conditionals"] for r in memory
          if r["implementation"] == "jaxbn"} == {1}
  assert "temp (x input)" in (tmp_path / "bench_accelerator.md").read_text()
  assert "jaxbn / flax" in (tmp_path / "bench_accelerator.md").read_text()
  assert (tmp_path / "bench_accelerator.png").stat().st_size > 1000
  assert json.loads((tmp_path / "bench_accelerator.json").read_text())[
      "platform"] == "cpu"
