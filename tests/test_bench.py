"""The benchmark runs end to end (a smoke test: tiny settings, no timing claims)."""
import json
import subprocess
import sys

from jaxbn import bench


def test_bench_quick_writes_table_json_and_chart(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "jaxbn.bench", "--quick", "--repeats", "1",
       "--impls", "jaxbn,flax.linen", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "bench.json").read_text())
  tunables = report["versions"]["GLIBC_TUNABLES"].split(":")
  assert set(bench._MALLOC_TUNABLES) <= set(tunables)
  first = report["results"][0]
  assert set(first["modes"]["fwd+bwd"]) == {"elementwise", "jaxbn",
                                            "flax.linen"}
  assert first["xla"]["jaxbn"]["fwd+bwd"]["bytes_accessed_x_input"] <= 10.2
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
