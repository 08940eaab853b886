"""Gradient-error estimators on a problem with closed-form bias and variance; --mode=grad_error,
--mode=search and --mode=pilot end to end."""
import json
import os

import ml_collections
import numpy as np
import pytest

from vit_accel import grad_error, step_plan
from vit_accel.errors import UserError
from vit_accel.modes import grad_error as grad_error_mode
from vit_accel.modes import pilot as pilot_mode
from vit_accel.modes import search as search_mode

MODEL = ml_collections.ConfigDict(dict(width=128, depth=4, mlp_ratio=4.0, patch_size=4,
                                       image_size=32))
D, B, SIGMA = 6, 8, 0.5
DROPPED = [4, 5]   # the "compressed" gradient never sees these features


def least_squares_problem(seed=0):
  """rng, w (current parameters), w* (truth): the dropped features carry a clear share of the
  gradient, so the bias is a sizeable fraction of ||g*||^2."""
  rng = np.random.default_rng(seed)
  w_star = rng.normal(size=D)
  w = w_star + np.array([0.5, -0.5, 0.5, -0.5, 1.0, -1.0])
  return rng, w, w_star


def batch_gradient(rng, w, w_star, mask):
  """Gradient of 1/2 mean (x_m . w - y)^2 over a batch, x ~ N(0, I), y = x . w* + noise, where the
  model sees the masked features x_m = x * mask."""
  x = rng.normal(size=(B, D))
  y = x @ w_star + SIGMA * rng.normal(size=B)
  xm = x * mask
  return xm.T @ (xm @ w - y) / B


def closed_form(w, w_star, mask):
  """(mean gradient, total variance of a batch gradient) for x ~ N(0, I) (Isserlis)."""
  d_eff = w * mask - w_star                      # residual direction the model really has
  mean = np.where(mask > 0, w - w_star, 0.0)
  per_coord = (d_eff @ d_eff + d_eff ** 2 + SIGMA ** 2) / B
  return mean, float(np.sum(per_coord * mask))


def moments_of(rng, w, w_star, mask, n):
  acc = grad_error.GradientMoments()
  for _ in range(n):
    acc.add(batch_gradient(rng, w, w_star, mask))
  return acc


def test_estimators_recover_closed_form_bias_and_variance():
  rng, w, w_star = least_squares_problem()
  full, drop = np.ones(D), np.ones(D)
  drop[DROPPED] = 0.0
  ref = moments_of(rng, w, w_star, full, 4000)
  cand = moments_of(rng, w, w_star, drop, 4000)
  row = grad_error.error_terms(ref, cand, cost_units=0.5, ref_cost_units=1.0)

  g_star, _ = closed_form(w, w_star, full)
  mean, variance = closed_form(w, w_star, drop)
  norm2 = g_star @ g_star
  assert row["grad_norm2"] == pytest.approx(norm2, rel=0.05)
  assert row["bias2"] == pytest.approx(np.sum((mean - g_star) ** 2) / norm2, rel=0.05)
  assert row["variance"] == pytest.approx(variance / norm2, rel=0.05)
  assert row["ca_mse"] == pytest.approx(row["bias2"] + 0.5 * row["variance"], rel=1e-12)
  expected_cos = mean @ g_star / np.linalg.norm(mean) / np.sqrt(norm2)
  assert row["cosine"] == pytest.approx(expected_cos, abs=0.01)
  # The reference's own variance, too.
  _, full_variance = closed_form(w, w_star, full)
  assert ref.variance == pytest.approx(full_variance, rel=0.05)


def test_unbiased_strategy_has_near_zero_bias_after_noise_correction():
  """Few batches: the plug-in squared bias of an *unbiased* estimate is pure estimator noise
  (~var/M + var/R); the corrected value removes it."""
  rng, w, w_star = least_squares_problem(1)
  full = np.ones(D)
  plugin, corrected = [], []
  for _ in range(200):
    ref = moments_of(rng, w, w_star, full, 10)
    cand = moments_of(rng, w, w_star, full, 10)
    row = grad_error.error_terms(ref, cand, 1.0, 1.0)
    plugin.append(row["bias2_plugin"])
    corrected.append(row["bias2"])
  _, variance = closed_form(w, w_star, full)
  g_star, _ = closed_form(w, w_star, full)
  assert np.mean(plugin) == pytest.approx(2 * variance / 10 / (g_star @ g_star), rel=0.25)
  assert np.mean(corrected) < 0.25 * np.mean(plugin)


def test_welford_matches_numpy():
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(50, 7)) * 3 + 1
  acc = grad_error.GradientMoments()
  for x in xs:
    acc.add(x)
  np.testing.assert_allclose(acc.mean, xs.mean(0), rtol=1e-12)
  assert acc.variance == pytest.approx(np.sum(xs.var(0, ddof=1)), rel=1e-12)


def row(strategy, ca_mse, cost):
  return {"strategy": strategy, "ca_mse": ca_mse, "cost_units": cost}


def test_search_mode_writes_a_schedule_file_training_reads(tmp_path):
  from conftest import tiny_config
  tables = [{"progress": 0.2, "rows": [row("full", 0.5, 8.0), row("keep0.25|keep0.25", 0.1, 2.0)]},
            {"progress": 0.8, "rows": [row("full", 0.1, 8.0), row("keep0.25|keep0.25", 0.3, 2.0)]}]
  (tmp_path / "grad_error.json").write_text(json.dumps({"tables": tables}))
  config = tiny_config()
  text = search_mode.run(config, str(tmp_path))
  assert text == "0.5:keep0.25|keep0.25; 1:full"
  config.schedule_file = str(tmp_path / "schedule.txt")
  stages = step_plan.schedule_stages(config)
  assert [(s.end, s.strategies.spec) for s in stages] == [(0.5, "keep0.25|keep0.25"), (1.0, "full")]
  config.schedule_file = str(tmp_path / "nope.txt")
  with pytest.raises(UserError, match="cannot be read"):
    step_plan.schedule_stages(config)
  os.remove(tmp_path / "grad_error.json")
  with pytest.raises(UserError, match="run --mode=grad_error"):
    search_mode.run(config, str(tmp_path))



def test_grad_error_then_search_on_a_tiny_run(tmp_path, needs_fashion_mnist):
  """--mode=grad_error on a run's milestone and final checkpoints, then --mode=search, then its
  schedule is accepted by training's config."""
  from conftest import tiny_config
  from vit_accel import train
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"checkpoint.at_progress": (0.3,), "checkpoint.every_steps": 100})
  train.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "milestones")) == ["2"]  # 2 / 6.5 steps >= 30%

  config.grad_error.reference_batches = 2
  config.grad_error.batches = 3
  config.grad_error.candidates = ("keep0.25|keep0.25",)
  saved = grad_error_mode.saved_steps(workdir)
  assert {s: os.path.basename(d) for s, d in saved.items()} == {2: "milestones", 6: "checkpoints"}
  config.grad_error.steps = (2, 6)  # by default only the milestones (when a run kept some)
  result = grad_error_mode.run(config, workdir)
  assert [t["step"] for t in result["tables"]] == [2, 6]
  for table in result["tables"]:
    full, keep = table["rows"]
    assert (full["strategy"], keep["strategy"]) == ("full", "keep0.25|keep0.25")
    assert keep["cost_units"] < full["cost_units"]
    assert (full["num_batches"], keep["num_batches"]) == (2, 3)
    assert full["bias2"] == 0 and full["cosine"] == pytest.approx(1.0)
    for r in (full, keep):
      assert np.isfinite(r["ca_mse"]) and r["variance"] > 0
      assert 0 <= r["bias2"] <= r["bias2_plugin"]
  saved = json.loads((tmp_path / "run" / "grad_error.json").read_text())
  assert saved["tables"][1]["rows"][1]["ca_mse"] == result["tables"][1]["rows"][1]["ca_mse"]
  assert (tmp_path / "run" / "grad_error.png").stat().st_size > 0

  text = search_mode.run(config, workdir)
  config.schedule_file = os.path.join(workdir, "schedule.txt")
  assert [s.strategies.spec for s in step_plan.schedule_stages(config)] == [
      p.split(":")[1] for p in text.split("; ")]
  step_plan.make_step_plan(config, 60000)  # the plan is a valid step plan for this model and budget

  config.grad_error.steps = (4,)
  with pytest.raises(UserError, match=r"grad_error.steps \[4\] not saved"):
    grad_error_mode.run(config, workdir)


def test_pilot_runs_measures_and_searches_in_one_call(tmp_path, needs_fashion_mnist):
  from conftest import tiny_config
  config = tiny_config(**{"pilot.budget_fraction": 1.0, "pilot.at_progress": (0.3, 0.9),
                          "grad_error.reference_batches": 2, "grad_error.batches": 2,
                          "grad_error.candidates": ("keep0.25|keep0.25",)})
  text = pilot_mode.run(config, str(tmp_path))
  pilot_dir = tmp_path / "pilot"
  assert sorted(os.listdir(pilot_dir / "milestones")) == ["2", "6"]  # 30% -> step 2, 90% -> 6
  measured = json.loads((pilot_dir / "grad_error.json").read_text())
  assert [t["step"] for t in measured["tables"]] == [2, 6]
  assert (tmp_path / "schedule.txt").read_text().strip().endswith(text)
  config.schedule_file = str(tmp_path / "schedule.txt")
  step_plan.make_step_plan(config, 60000)
