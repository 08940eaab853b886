"""--mode=report draws the schedule, kNN and loss plots and the per-stage sample images."""
import json
import os

import pytest

from conftest import tiny_config
from vit_accel import step_plan
from vit_accel.errors import UserError
from vit_accel.modes import Args
from vit_accel.modes import report as report_mode


def fake_run(directory, config, speed, input_wait=None):
  """metrics.jsonl + plan.json as a run of `config` would write them (`input_wait`: the share of
  training spent waiting for input; None: a run logged before it was measured)."""
  os.makedirs(directory)
  plan = step_plan.make_step_plan(config, 60000)
  with open(os.path.join(directory, "plan.json"), "w") as f:
    f.write(plan.to_json())
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "knn_top1": 0.5, "wall_s": 0.0, "budget_units": 0.0}) + "\n")
    for step in range(1, plan.total_steps + 1):
      stage = plan.stage_at(step - 1)
      f.write(json.dumps({"step": step, "loss": 4.0 - step / plan.total_steps, "stage": stage.index,
                          "seq_len": stage.seq_len, "budget_units": plan.units_at(step),
                          "budget_progress": plan.progress_at(step), "wall_s": step / speed,
                          "train_wall_s": step / speed}
                         | ({} if input_wait is None else
                            {"input_wait_s": input_wait * step / speed}))
              + "\n")
    f.write(json.dumps({"step": plan.total_steps, "knn_top1": 0.6, "wall_s": plan.total_steps / speed,
                        "budget_units": plan.units_at(plan.total_steps)}) + "\n")


def test_report_writes_plots_and_table(tmp_path, capsys, needs_fashion_mnist):
  fast = tiny_config(schedule="0.4:keep0.25|keep0.25; 0.7:patch8; 1:full")
  fake_run(str(tmp_path / "fast"), fast, speed=4.0, input_wait=0.125)
  fake_run(str(tmp_path / "base"), tiny_config(), speed=1.0)
  written = report_mode.run(fast, str(tmp_path / "fast"),
                            Args(compare=(str(tmp_path / "base"),)))
  names = {os.path.basename(p) for p in written}
  assert {"schedule.png", "knn_vs_wall.png", "knn_vs_budget.png", "loss.png",
          "stages.png"} <= names
  for path in written:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000
  table = capsys.readouterr().out
  assert "fast" in table and "base" in table and "keep0.25|keep0.25 -> patch8 -> full" in table
  rows = {line.split()[0]: line for line in table.splitlines() if line.startswith(("fast", "base"))}
  assert " 12.5% " in rows["fast"] and " - " in rows["base"]   # the older run: not measured


def test_report_on_a_directory_without_metrics_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match="no metrics.jsonl"):
    report_mode.run(tiny_config(), str(tmp_path), Args())
