"""Schedule search: a compression schedule from gradient-error tables (Lin et al., NeurIPS 2024:
follow the strategy of lowest CA-MSE along training).

Each analysed checkpoint stands for the budget interval around it (boundaries half-way between
neighbouring checkpoints; the first interval starts at 0, the last ends at 1). In each interval the
strategy with the lowest CA-MSE wins; strategies within `search.tie_tolerance` (relative) of the
lowest count as tied and the cheapest of them wins (the estimates are noisy; a cheaper step is a sure
gain). Neighbouring intervals with the same winner merge. The result is a schedule string that
training accepts as-is (`schedule` or, written to a file by --mode=search, `schedule_file`).

Pure: tables in, stages and text out (no JAX, no files). --mode=search (vit_accel/modes/search.py)
reads grad_error.json and writes WORKDIR/schedule.txt; the online schedule (online.py) uses `pick`.
"""
from __future__ import annotations

from vit_accel.errors import UserError


def pick(rows: list[dict], tie_tolerance: float) -> dict:
  """The row with the lowest ca_mse; rows within (1 + tie_tolerance) x the lowest are ties, and the
  cheapest (then the lowest ca_mse) of them wins."""
  best = min(r["ca_mse"] for r in rows)
  tied = [r for r in rows if r["ca_mse"] <= best * (1.0 + tie_tolerance)]
  return min(tied, key=lambda r: (r["cost_units"], r["ca_mse"]))


def search_stages(tables: list[dict], tie_tolerance: float, final_full: bool = False) -> list[dict]:
  """[{end, strategy, cost_units, progress_points}] from tables sorted by progress. `final_full`:
  the last interval runs at full length whatever it measured (CA-MSE scores gradients at the
  compressed length and cannot see the train/eval length mismatch a final full stage removes)."""
  if not tables:
    raise UserError("no gradient-error tables to search a schedule from; run --mode=grad_error "
                    "first")
  tables = sorted(tables, key=lambda t: t["progress"])
  stages = []
  for i, table in enumerate(tables):
    end = 1.0 if i == len(tables) - 1 else (table["progress"] + tables[i + 1]["progress"]) / 2
    winner = pick(table["rows"], tie_tolerance)
    if final_full and i == len(tables) - 1:
      winner = next(r for r in table["rows"] if r["strategy"] == "full")
    if stages and stages[-1]["strategy"] == winner["strategy"]:
      stages[-1]["end"] = end
      stages[-1]["progress_points"].append(table["progress"])
    else:
      stages.append({"end": end, "strategy": winner["strategy"],
                     "cost_units": winner["cost_units"], "progress_points": [table["progress"]]})
  return stages


def schedule_string(stages: list[dict]) -> str:
  """The stages as a schedule training reads: 'END:SPEC; ...', the last END exactly 1."""
  parts = []
  for s in stages:
    end = 1.0 if s is stages[-1] else round(s["end"], 4)
    parts.append(f"{end:g}:{s['strategy']}")
  return "; ".join(parts)


def samples_vs_baseline(stages: list[dict], full_cost: float) -> float:
  """Training samples the schedule processes for the budget, relative to the uncompressed baseline
  (each stage's share of the budget divided by its cost relative to full length)."""
  start, total = 0.0, 0.0
  for s in stages:
    total += (s["end"] - start) * full_cost / s["cost_units"]
    start = s["end"]
  return total
