"""Time-to-accuracy arithmetic on constructed curves."""
import json

import pytest

from vit_accel import time_to_accuracy as tta


def test_crossing_is_interpolated_between_evaluations():
  curve = [(0.0, 0.5), (10.0, 0.6), (20.0, 0.8)]
  assert tta.time_to_reach(curve, 0.7) == pytest.approx(15.0)
  assert tta.time_to_reach(curve, 0.6) == 10.0
  assert tta.time_to_reach(curve, 0.4) == 0.0        # already there at the first point
  assert tta.time_to_reach(curve, 0.81) is None      # never reached


def test_first_crossing_counts_even_if_the_curve_dips_later():
  curve = [(0.0, 0.5), (10.0, 0.9), (20.0, 0.7), (30.0, 0.95)]
  assert tta.time_to_reach(curve, 0.7) == pytest.approx(0.0 + 0.2 / 0.4 * 10.0)


def test_speedup_against_the_baseline_final_accuracy():
  baseline = [(0.0, 0.5), (50.0, 0.6), (100.0, 0.7)]
  accelerated = [(0.0, 0.5), (10.0, 0.65), (20.0, 0.75), (90.0, 0.8)]
  out = tta.speedup(baseline, accelerated)
  assert out["target"] == 0.7
  assert out["baseline_x"] == 100.0
  assert out["accelerated_x"] == pytest.approx(15.0)
  assert out["speedup"] == pytest.approx(100.0 / 15.0)
  assert out["reached"]


def test_speedup_counts_the_baseline_reaching_its_final_accuracy_early():
  baseline = [(0.0, 0.5), (50.0, 0.7), (100.0, 0.7)]
  out = tta.speedup(baseline, [(0.0, 0.5), (25.0, 0.7)])
  assert out["baseline_x"] == 50.0 and out["speedup"] == pytest.approx(2.0)


def test_never_reached_is_reported_as_such_not_as_a_number():
  out = tta.speedup([(0.0, 0.5), (100.0, 0.8)], [(0.0, 0.5), (30.0, 0.7), (60.0, 0.79)])
  assert out["reached"] is False
  assert out["speedup"] is None and out["accelerated_x"] is None


def test_eval_curve_reads_training_evaluations_only(tmp_path):
  lines = [{"step": 4, "knn_top1": 0.6, "train_wall_s": 9.0},
           {"step": 0, "knn_top1": 0.5, "train_wall_s": 0.0},
           {"step": 2, "loss": 3.0, "train_wall_s": 4.0},
           {"step": 4, "knn_top1": 0.9, "evaluated_by": "mode=eval"}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  assert tta.eval_curve(str(tmp_path), "train_wall_s") == [(0.0, 0.5), (9.0, 0.6)]


def test_budget_curve_is_read_linearly_in_log_budget():
  curve = [(4.0, 0.8), (1.0, 0.6), (2.0, 0.7)]      # any order
  out = tta.budget_to_reach(curve, 0.65)
  assert out["budget"] == pytest.approx(2 ** 0.5)    # halfway between 1 and 2 on a log axis
  assert out["extrapolated"] is None and out["bracket"] == (0, 1)
  assert tta.budget_to_reach(curve, 0.7)["budget"] == pytest.approx(2.0)


def test_budget_curve_extrapolation_is_flagged_both_ways():
  curve = [(1.0, 0.6), (2.0, 0.7), (4.0, 0.75)]
  below = tta.budget_to_reach(curve, 0.5)            # the smallest run already beats the target
  assert below["budget"] == pytest.approx(0.5) and below["extrapolated"] == "below"
  above = tta.budget_to_reach(curve, 0.8)            # the trend of the last two runs, extended
  assert above["budget"] == pytest.approx(8.0) and above["extrapolated"] == "above"
  assert above["bracket"] == (1, 2)


def test_budget_curve_that_stops_rising_gives_no_number():
  out = tta.budget_to_reach([(1.0, 0.6), (2.0, 0.7), (4.0, 0.69)], 0.72)
  assert out["budget"] is None and out["extrapolated"] is None
  # the first run to reach the target counts even if a larger budget dips below it again
  assert tta.budget_to_reach([(1.0, 0.6), (2.0, 0.75), (4.0, 0.7)], 0.72)["budget"] < 2.0
  with pytest.raises(ValueError, match="at least two"):
    tta.budget_to_reach([(1.0, 0.6)], 0.5)


def test_target_below_a_falling_start_is_an_upper_bound_not_a_miss():
  out = tta.budget_to_reach([(1.0, 0.62), (2.0, 0.60), (4.0, 0.7)], 0.55)
  assert out["budget"] == 1.0 and out["at_most"] and out["extrapolated"] is None
  exact = tta.budget_to_reach([(1.0, 0.55), (2.0, 0.60)], 0.55)
  assert exact["budget"] == 1.0 and not exact["at_most"]
