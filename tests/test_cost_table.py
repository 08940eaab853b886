"""--mode=cost: one row per distinct strategy, full length first, speed-ups relative to it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from vit_accel import compression, cost_table


def test_cost_table_rows():
  config = tiny_config(**{"compression.cost_candidates": ("keep0.25|keep0.25", "full|full"),
                          "compression.cost_repeats": 5})
  seen = []
  rows = cost_table.measure(config, on_row=seen.append)
  assert seen == rows
  assert [r["strategy"] for r in rows] == ["full", "keep0.25|keep0.25"]  # duplicate full dropped
  full, keep = rows
  assert full["measured_speedup"] == 1.0 and full["analytic_speedup"] == 1.0
  assert (full["seq_len"], keep["seq_len"], keep["key_seq_len"]) == (65, 17, 17)
  for r in rows:
    assert r["ms_per_step"] > 0
    assert r["analytic_flops"] == pytest.approx(
        r["analytic_units"] * compression.base_forward_flops(config.model) * config.batch_size)
  assert keep["analytic_speedup"] > 2.0
  assert keep["measured_speedup"] == pytest.approx(full["ms_per_step"] / keep["ms_per_step"])
  table = cost_table.format_table(rows).splitlines()
  assert len(table) == 4 and table[3].startswith("keep0.25|keep0.25")


def test_cost_mode_writes_its_files_and_never_imports_tensorflow(tmp_path):
  """main.py --mode=cost times synthetic batches: TensorFlow (the input pipeline) is never loaded."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  probe = ("import atexit, runpy, sys\n"
           "atexit.register(lambda: print('tensorflow loaded:', 'tensorflow' in sys.modules))\n"
           "sys.argv = ['main.py'] + sys.argv[1:]\n"
           "runpy.run_path('main.py', run_name='__main__')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-c", probe, "--config=configs/fmnist_mocov3.py:smoke",
       f"--workdir={tmp_path}", "--mode=cost", "--config.batch_size=16",
       "--config.compression.cost_candidates=('keep0.25|keep0.25',)",
       "--config.compression.cost_repeats=5", "--config.compile_cache_dir="],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tensorflow loaded: False" in proc.stdout, proc.stdout[-2000:]
  rows = json.loads((tmp_path / "cost_table.json").read_text())
  assert [r["strategy"] for r in rows] == ["full", "keep0.25|keep0.25"]
  assert json.loads((tmp_path / "cost_table_meta.json").read_text())["batch_size"] == 16
  assert json.loads((tmp_path / "config.cost.json").read_text())["batch_size"] == 16
