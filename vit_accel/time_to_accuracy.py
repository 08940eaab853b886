"""Time-to-accuracy: when does a run first reach a target accuracy, and how much sooner than another?

Curves are a run's evaluation points (x = training wall-clock seconds or budget units, y = kNN
top-1), read from its metrics.jsonl. Between two evaluations the accuracy is taken as linear, so the
crossing time is interpolated; a run that never reaches the target has no time (None), never a
made-up number.
"""
from __future__ import annotations

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
