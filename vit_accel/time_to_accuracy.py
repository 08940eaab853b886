"""Time-to-accuracy: when does a run first reach a target accuracy, and how much sooner than another?

Curves are a run's evaluation points (x = training wall-clock seconds or budget units, y = kNN
top-1), read from its metrics.jsonl. Between two evaluations the accuracy is taken as linear, so the
crossing time is interpolated; a run that never reaches the target has no time (None), never a
made-up number. `budget_to_reach` reads the other kind of curve the paper defines its speed-up on:
final accuracy against budget, one run per budget.
"""
from __future__ import annotations

import math

from vit_accel.metric_writer import read_metrics


def eval_curve(workdir: str, x_key: str, y_key: str = "knn_top1") -> list[tuple[float, float]]:
  """(x, y) of a run's training-time evaluations, in step order (--mode=eval lines left out)."""
  rows = [m for m in read_metrics(workdir, kind="eval")
          if y_key in m and x_key in m and "evaluated_by" not in m]
  rows.sort(key=lambda m: m["step"])
  return [(float(m[x_key]), float(m[y_key])) for m in rows]


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
  """x at which the piecewise-linear curve first reaches `target`; None if it never does."""
  prev = None
  for x, y in curve:
    if y >= target:
      if prev is None or prev[1] >= target:
        return x
      (x0, y0) = prev
      return x0 + (target - y0) / (y - y0) * (x - x0)
    prev = (x, y)
  return None


def speedup(baseline: list[tuple[float, float]], accelerated: list[tuple[float, float]]) -> dict:
  """How much sooner `accelerated` reaches the baseline's final accuracy.

  Returns target (the baseline's last point), baseline_x / accelerated_x (first time each reaches
  it; the baseline may reach it before its end), and speedup = baseline_x / accelerated_x, or None
  with reached=False when the accelerated run never gets there."""
  if not baseline or not accelerated:
    raise ValueError("both runs need at least one evaluation")
  target = baseline[-1][1]
  base_x = time_to_reach(baseline, target)
  accel_x = time_to_reach(accelerated, target)
  reached = accel_x is not None
  return {"target": target, "baseline_x": base_x, "accelerated_x": accel_x, "reached": reached,
          "speedup": (base_x / accel_x) if reached and accel_x > 0 else None}


def budget_to_reach(curve: list[tuple[float, float]], target: float) -> dict:
  """Budget at which a final-accuracy-vs-budget curve first reaches `target` (the paper's speed-up).

  Each point is (budget, final accuracy) of a separate run trained to that budget (its learning
  rate schedule spans that budget), so the curve is read between runs, not along one: between the
  two bracketing points accuracy is taken as linear in log(budget) (budget axes are logarithmic). Outside the swept range the nearest two points' log-linear trend
  is extended, flagged `extrapolated` ('below' the smallest budget / 'above' the largest), and only
  when that trend rises. A target below the smallest run's accuracy with no rising trend to extend
  gives that run's budget with `at_most` True (reached at or before it); a target above every run
  with no rising trend gives budget None.

  Args:
    curve: (budget > 0, accuracy) pairs, any order; budgets distinct.
    target: accuracy to reach.
  Returns:
    {"budget": float | None, "extrapolated": None | "below" | "above", "bracket": (i, j) indices
    into the budget-sorted curve whose points the answer was read from (None if budget is None),
    "at_most": bool (budget is an upper bound)}.
  Raises:
    ValueError: fewer than two points, or a budget <= 0.
  """
  pts = sorted(curve)
  if len(pts) < 2:
    raise ValueError(f"a budget curve needs at least two runs, got {len(pts)}")
  if pts[0][0] <= 0:
    raise ValueError(f"budgets must be > 0, got {pts[0][0]}")

  def along(i: int, j: int) -> float | None:
    (b0, y0), (b1, y1) = pts[i], pts[j]
    if y1 <= y0:
      return None
    return float(math.exp(math.log(b0) + (target - y0) / (y1 - y0) * (math.log(b1) - math.log(b0))))

  for j, (b, y) in enumerate(pts):
    if y >= target:
      if j == 0:
        below = None if y == target else along(0, 1)
        if below is None:   # exactly at the smallest run, or no rising trend to extend below it
          return {"budget": b, "extrapolated": None, "bracket": (0, 1), "at_most": y > target}
        return {"budget": below, "extrapolated": "below", "bracket": (0, 1), "at_most": False}
      return {"budget": along(j - 1, j), "extrapolated": None, "bracket": (j - 1, j),
              "at_most": False}
  n = len(pts)
  budget = along(n - 2, n - 1)
  return {"budget": budget, "extrapolated": "above" if budget is not None else None,
          "bracket": (n - 2, n - 1) if budget is not None else None, "at_most": False}
