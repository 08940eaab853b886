"""bench/budget_sweep.py end to end on the smoke recipe: tuning grid, sweep, report, and a restart
that skips every finished run."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every run uses the test session's compile cache (compile_cache_dir="" falls back to
# JAX_COMPILATION_CACHE_DIR, set in conftest): the arms and seeds, and the other tests' smoke runs,
# compile the same few steps, so later runs load them instead of compiling them again.


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


@pytest.mark.slow
def test_schedule_comparison_charges_the_pilot_and_reports_noise_and_reasons(
    tmp_path, needs_fashion_mnist):
  """bench/schedule_comparison.py on the smoke recipe: the searched arm (pilot included) spends the
  preset's budget, every seed is run, the verdict uses the preset's measured seed range, the plan
  files with their reasons are kept, and a restart runs nothing. 2 + 2 batches cannot displace
  the preset as a prior: that arm's pilot spends nothing and it runs the preset; without a prior
  the pilot measures and is charged."""
  cmd = [sys.executable, os.path.join(ROOT, "bench", "schedule_comparison.py"),
         "--config_arg=smoke", "--settings=recipe",
         "--arms=accelerated=dynamic,searched=pilot,searched_prior=pilot",   # dynamic: the prior
         "--arm_overrides=searched:search.prior=",
         "--budgets=0.05", "--seeds=0,1", f"--out_dir={tmp_path / 'out'}",
         f"--workdir_root={tmp_path / 'runs'}", "--tag=tiny",
         "--extra=compile_cache_dir=,tensorboard=False,"
         "grad_error.reference_batches=2,"
         "grad_error.batches=2,grad_error.max_rounds=1,pilot.measure_fraction=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  records = {(r["arm"], r["seed"]): r for r in map(json.loads, open(
      tmp_path / "out" / "budget_sweep_mocov3_tiny.jsonl"))}
  assert sorted(records) == [(arm, seed) for arm in ("accelerated", "searched", "searched_prior")
                             for seed in (0, 1)]
  for seed in (0, 1):
    preset, searched = records["accelerated", seed], records["searched", seed]
    # equal total budget: the pilot's units are in the searched arm's, which matches the preset's
    # to within a step of the smoke model
    assert 0 < searched["pilot_units"] < searched["budget_units"]
    assert abs(searched["budget_units"] / preset["budget_units"] - 1) < 0.05
    assert len(searched["why"]) == 4 and all(
        re.match(r"at \d+%: lowest CA-MSE \S+ \d+\.\d{4} \[", line) for line in searched["why"])
    assert preset["why"] == []
    prior = records["searched_prior", seed]
    assert prior["pilot_units"] == 0 and prior["pilot_wall_s"] == 0
    assert prior["stages"] == preset["stages"] and prior["budget_units"] == preset["budget_units"]
    assert all("the prior, unmeasured" in line for line in prior["why"])
  report = json.load(open(tmp_path / "out" / "schedule_comparison_mocov3_tiny.json"))
  (row,) = report["budgets"]
  knn = {arm: e["knn"] for arm, e in row["arms"].items()}
  # the noise is the fixed schedule's seed range; the searched arm's choices are not noise
  assert row["noise"] == pytest.approx(max(knn["accelerated"]) - min(knn["accelerated"]))
  diff = row["arms"]["searched"]["diff"]
  assert diff == pytest.approx(sum(knn["searched"]) / 2 - sum(knn["accelerated"]) / 2)
  expected = ("above" if diff > row["noise"] else "within noise" if diff >= -row["noise"]
              else "below")
  assert row["arms"]["searched"]["verdict"] == expected
  kept = tmp_path / "out" / "schedule_comparison_mocov3_tiny"
  plans = sorted(os.listdir(kept))
  assert plans == [f"{arm}_b0.05_lr0.002_bs64_s{s}.schedule.txt"
                   for arm in ("searched", "searched_prior") for s in (0, 1)]
  assert "# at " in open(kept / plans[0]).read()

  second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "main.py" not in second.stdout


@pytest.mark.slow
def test_gpu_sweep_tiny_probes_the_input_runs_device_views_and_keeps_to_its_deadline(
    tmp_path, needs_fashion_mnist):
  """bench/gpu_sweep.py --tiny on the CPU: the input probe (device views and tf.data), a sweep
  with the CPU sweep's tuned settings and views made on the device; called again with more budgets
  and a deadline already passed, it starts nothing, keeps the finished runs and lists the rest."""
  out = tmp_path / "out"

  def gpu_sweep(budgets, deadline):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_sweep.py"), "--tiny",
           "--objectives=mocov3", f"--budgets={budgets}", "--low_budgets=",
           f"--deadline_s={deadline}", "--probe_batches=3", f"--out_dir={out}",
           f"--workdir_root={tmp_path / 'runs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(out / "gpu_sweep_cpu_tiny.json")), proc.stdout

  report, _ = gpu_sweep("0.02", 900)
  probe = report["probes"][0]
  assert probe["objective"] == "mocov3" and probe["device_images_per_s"] > 0
  assert probe["host_images_per_s"] > 0   # TensorFlow imports here
  sweep = report["sweeps"]["mocov3"]
  assert sorted(r["arm"] for r in sweep["runs"]) == ["accelerated", "baseline"]
  assert not sweep["not_started"] and len(sweep["speedups"]) == 1
  tuned = json.load(open(os.path.join(ROOT, "bench", "results", "budget_sweep_mocov3.json")))
  for run in sweep["runs"]:
    assert [run["base_lr"], run["batch_size"]] == tuned["best"][run["arm"]]
    assert "data.augment_on=device" in run["extra"]

  report, stdout = gpu_sweep("0.02,0.04", 0)
  sweep = report["sweeps"]["mocov3"]
  assert "main.py" not in stdout and len(sweep["runs"]) == 2
  assert sorted(sweep["not_started"]) == ["accelerated_b0.04_lr0.002_bs128_s0",
                                          "baseline_b0.04_lr0.001_bs64_s0"]
  assert "Out of time" in open(out / "gpu_sweep_cpu_tiny.md").read()


def test_budget_sweep_settings_from_a_missing_report_is_one_error_line(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "bench", "budget_sweep.py"), "--dry_run",
         f"--settings_from={tmp_path / 'none.json'}", f"--out_dir={tmp_path}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --settings_from=")
