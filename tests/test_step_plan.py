"""Schedules: parsing, step-plan arithmetic, and lr / momentum on budget progress."""
import math

import ml_collections
import numpy as np
import pytest

from vit_accel import optimizer, step_plan
from vit_accel.compression import BranchStrategies
from vit_accel.errors import UserError
from vit_accel.objectives import mocov3

MODEL = ml_collections.ConfigDict(dict(width=128, depth=4, mlp_ratio=4.0, patch_size=4,
                                       image_size=32))
# A toy cost: per-sample units = query tokens / 65 (so full = 1, keep0.25 = 17/65).
COST = lambda st: st.query.layout(32, 4).seq_len / 65


def stages(spec):
  return step_plan.parse_schedule(spec, 8, MODEL)


def test_presets_parse_and_dynamic_starts_compressed_and_ends_full():
  for name in step_plan.presets(4):
    assert stages(name)[-1].end == 1.0
  dyn = stages("dynamic")
  lens = [s.strategies.query.layout(32, 4).seq_len for s in dyn]
  assert lens == sorted(lens) and lens[0] < lens[-1] == 65
  assert stages("none")[0].strategies == BranchStrategies.parse("full|full")
  assert stages("patch_scale")[0].strategies.query.patch_size == 8


def test_custom_stage_list():
  st = stages("0.5:keep0.25|keep0.25; 0.75:patch8 ; 1:full")
  assert [s.end for s in st] == [0.5, 0.75, 1.0]
  assert st[1].strategies.query.patch_size == 8 and st[1].strategies.key.patch_size == 0


@pytest.mark.parametrize("spec,match", [
    ("0.5:full; 0.4:full; 1:full", "increase"), ("0.5:full", "last must be 1"),
    ("fast", "cannot read stage"), ("1:keep2", "outside"), ("1:patch64", "larger than"),
    ("0.5 keep0.25; 1:full", "cannot read stage")])
def test_bad_schedules_raise_one_clear_error(spec, match):
  with pytest.raises(UserError, match=match):
    stages(spec)


def test_step_plan_arithmetic():
  st = stages("0.5:keep0.25|keep0.25; 1:full")
  plan = step_plan.make_plan(st, budget=10000.0, batch_size=10, cost_per_sample=COST, model_cfg=MODEL)
  s0, s1 = plan.stages
  assert s0.units_per_step == pytest.approx(10 * 17 / 65)
  assert s0.num_steps == math.floor(0.5 * 10000 / (10 * 17 / 65))
  assert s1.num_steps == math.floor(0.5 * 10000 / 10) == 500
  assert (s0.start_step, s1.start_step) == (0, s0.num_steps)
  assert plan.total_steps == s0.num_steps + 500
  assert s1.start_units == pytest.approx(s0.num_steps * s0.units_per_step)
  assert (s0.seq_len, s1.seq_len) == (17, 65)
  # units / progress / stage at the boundaries
  assert plan.units_at(0) == 0.0
  assert plan.units_at(s0.num_steps) == pytest.approx(s1.start_units)
  assert plan.units_at(plan.total_steps) <= 10000.0 + 1e-6
  assert plan.progress_at(plan.total_steps) > 0.99
  assert plan.stage_at(s0.num_steps - 1).index == 0 and plan.stage_at(s0.num_steps).index == 1
  units = [plan.units_at(k) for k in range(plan.total_steps + 1)]
  assert np.all(np.diff(units) > 0)
  # step_at_progress: the first step with at least that fraction spent (brute force agrees)
  for f in (0.0, 0.1, 0.25, 0.5, 0.5 + 1e-9, 0.9, 1.0, 2.0):
    expected = next((k for k in range(plan.total_steps + 1) if plan.progress_at(k) >= f - 1e-12),
                    plan.total_steps)
    assert plan.step_at_progress(f) == expected, f
  assert plan.step_at_progress(0.5) == s0.num_steps + (plan.progress_at(s0.num_steps) < 0.5)


def test_compressed_stage_takes_more_steps_for_the_same_budget():
  full = step_plan.make_plan(stages("none"), 5000.0, 10, COST, MODEL)
  fast = step_plan.make_plan(stages("1:keep0.25"), 5000.0, 10, COST, MODEL)
  assert fast.total_steps > 3 * full.total_steps
  assert full.progress_at(full.total_steps) == pytest.approx(1.0)


def test_every_stage_gets_a_step_or_a_clear_error():
  with pytest.raises(UserError, match="too small .* stage 1"):
    step_plan.make_plan(stages("0.99:keep0.25; 1:full"), 500.0, 10, COST, MODEL)


def test_plan_round_trips_to_json():
  plan = step_plan.make_plan(stages("dynamic"), 1e5, 16, COST, MODEL)
  d = plan.to_dict()
  assert d["total_steps"] == plan.total_steps
  assert [s["spec"] for s in d["stages"]] == [s.spec for s in plan.stages]
  assert "stage 2" in plan.describe()


def _optim(**kw):
  c = ml_collections.ConfigDict()
  c.batch_size = 256
  c.optim = ml_collections.ConfigDict(dict(base_lr=1e-3, warmup_fraction=0.1, lr_end_factor=0.0,
                                           **kw))
  return c


def test_learning_rate_on_budget_progress():
  c = _optim()
  lr = lambda p: float(optimizer.learning_rate_at(c, p))
  assert lr(0.0) == 0.0
  assert lr(0.05) == pytest.approx(0.5e-3)
  assert lr(0.1) == pytest.approx(1e-3)
  assert lr(0.55) == pytest.approx(0.5e-3, rel=1e-5)   # half-way through the cosine
  assert lr(1.0) == pytest.approx(0.0, abs=1e-12)
  tail = [lr(p) for p in np.linspace(0.1, 1.0, 50)]
  assert np.all(np.diff(tail) <= 1e-12)
  c.batch_size = 512
  assert lr(0.1) == pytest.approx(2e-3)                # linear scaling rule


def test_momentum_on_budget_progress():
  assert float(mocov3.momentum_at(0.0, 0.99)) == pytest.approx(0.99)
  assert float(mocov3.momentum_at(0.5, 0.99)) == pytest.approx(0.995)
  assert float(mocov3.momentum_at(1.0, 0.99)) == pytest.approx(1.0)


def test_local_crops_by_step_follows_the_stages_crop_counts():
  from conftest import tiny_config
  cfg = tiny_config(recipe="dino", steps=10)
  cfg.aug.local_crops = 4
  cfg.schedule = "0.5:patch8|patch8|full,crops2; 0.8:full|full|full,crops0; 1:full"
  plan = step_plan.make_step_plan(cfg, 1000)
  table = step_plan.local_crops_by_step(cfg, plan)
  assert [n for _, n in table] == [2, 0, 4]
  assert [end for end, _ in table] == [s.end_step for s in plan.stages]
  assert table[-1][0] == plan.total_steps
  # Nothing to skip: every stage on all crops, a recipe without local crops, an online schedule.
  cfg.schedule = "0.5:patch8|patch8|full; 1:full"
  assert step_plan.local_crops_by_step(cfg, step_plan.make_step_plan(cfg, 1000)) is None
  moco = tiny_config(steps=10, schedule="0.5:keep0.25; 1:full")
  assert step_plan.local_crops_by_step(moco, step_plan.make_step_plan(moco, 1000)) is None
  cfg.schedule = "online"   # even with a plan that has crops2 stages: later decisions may not
  assert step_plan.local_crops_by_step(cfg, plan) is None
