"""bench/budget_sweep.py end to end on the smoke recipe: tuning grid, sweep, report, and a restart
that skips every finished run."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_sweep_runs_reports_and_resumes_without_rerunning(tmp_path, needs_fashion_mnist):
  cmd = [sys.executable, os.path.join(ROOT, "bench", "budget_sweep.py"), "--config_arg=smoke",
         "--budgets=0.005,0.01", "--low_budgets=", "--tune_budget=0.005", "--lr_factors=1",
         "--batches=64", "--extra_seeds=", f"--out_dir={tmp_path / 'out'}",
         f"--workdir_root={tmp_path / 'runs'}", "--tag=tiny",
         "--extra=compile_cache_dir=,tensorboard=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  stem = tmp_path / "out" / "budget_sweep_mocov3_tiny"
  records = [json.loads(line) for line in open(f"{stem}.jsonl")]
  assert sorted((r["arm"], r["budget_epochs"]) for r in records) == [
      ("accelerated", 0.005), ("accelerated", 0.01), ("baseline", 0.005), ("baseline", 0.01)]
  for r in records:
    assert 0 < r["final_knn"] <= 1 and r["train_wall_s"] > 0 and r["budget_units"] > 0
  base = {r["budget_epochs"]: r for r in records if r["arm"] == "baseline"}
  # twice the budget: about twice the units (whole steps: 9 vs 4 at this size)
  assert 1.5 < base[0.01]["budget_units"] / base[0.005]["budget_units"] < 2.5
  report = json.load(open(f"{stem}.json"))
  assert [row["budget_epochs"] for row in report["speedups"]] == [0.005, 0.01]
  assert "## Speed-up" in open(f"{stem}.md").read() and os.path.getsize(f"{stem}.png") > 0

  # Started again: every run is in the .jsonl, so nothing trains and nothing is appended.
  second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "main.py" not in second.stdout
  assert len(open(f"{stem}.jsonl").readlines()) == 4
