"""The benchmark runs end to end (a smoke test: tiny settings, no timing claims)."""
import json
import subprocess
import sys

from jaxbn import bench


def test_bench_quick_writes_table_json_and_chart(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "jaxbn.bench", "--quick", "--repeats", "2",
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
