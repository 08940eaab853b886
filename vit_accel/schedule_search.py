"""`--mode=plan`: a compression schedule from gradient-error tables (Lin et al., NeurIPS 2024:
follow the strategy of lowest CA-MSE along training).

Each analysed checkpoint stands for the budget interval around it (boundaries half-way between
neighbouring checkpoints; the first interval starts at 0, the last ends at 1). In each interval the
strategy with the lowest CA-MSE wins; strategies within `plan.tie_tolerance` (relative) of the lowest
count as tied and the cheapest of them wins (the estimates are noisy; a cheaper step is a sure gain).
Neighbouring intervals with the same winner merge. The result is a schedule string that training
accepts as-is: WORKDIR/schedule.txt, used with --config.schedule_file=WORKDIR/schedule.txt.
"""
from __future__ import annotations

import json
import os

from vit_accel.errors import UserError


def pick(rows: list[dict], tie_tolerance: float) -> dict:
  """The row with the lowest ca_mse; rows within (1 + tie_tolerance) x the lowest are ties, and the
  cheapest (then the lowest ca_mse) of them wins."""
  best = min(r["ca_mse"] for r in rows)
  tied = [r for r in rows if r["ca_mse"] <= best * (1.0 + tie_tolerance)]
  return min(tied, key=lambda r: (r["cost_units"], r["ca_mse"]))


def plan_stages(tables: list[dict], tie_tolerance: float, final_full: bool = False) -> list[dict]:
  """[{end, strategy, cost_units, progress_points}] from tables sorted by progress. `final_full`:
  the last interval runs at full length whatever it measured (CA-MSE scores gradients at the
  compressed length and cannot see the train/eval length mismatch a final full stage removes)."""
  if not tables:
    raise UserError("no gradient-error tables to plan from; run --mode=grad_error first")
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
  parts = []
  for s in stages:
    end = 1.0 if s is stages[-1] else round(s["end"], 4)
    parts.append(f"{end:g}:{s['strategy']}")
  return "; ".join(parts)


def samples_vs_baseline(stages: list[dict], full_cost: float) -> float:
  """Training samples the plan processes for the budget, relative to the uncompressed baseline
  (each stage's share of the budget divided by its cost relative to full length)."""
  start, total = 0.0, 0.0
  for s in stages:
    total += (s["end"] - start) * full_cost / s["cost_units"]
    start = s["end"]
  return total


def run(config, workdir: str) -> str:
  path = config.plan.get("grad_error_file", "") or os.path.join(workdir, "grad_error.json")
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; run --mode=grad_error on this workdir first (or set "
                    f"plan.grad_error_file)")
  with open(path) as f:
    result = json.load(f)
  tables = result["tables"]
  stages = plan_stages(tables, float(config.plan.tie_tolerance),
                       bool(config.plan.get("final_full", False)))
  text = schedule_string(stages)
  full_cost = next(r["cost_units"] for r in tables[0]["rows"] if r["strategy"] == "full")
  out = os.path.join(workdir, "schedule.txt")
  with open(out + ".tmp", "w") as f:
    f.write(f"# planned by --mode=plan from {path}\n{text}\n")
  os.replace(out + ".tmp", out)
  print("planned schedule (budget fraction where each stage ends : strategy):")
  start = 0.0
  for s in stages:
    print(f"  {start:5.1%} - {s['end']:5.1%}  {s['strategy']:<22} cost {s['cost_units']:.2f} units"
          f"/sample ({s['cost_units'] / full_cost:.2f} of full); chosen at progress "
          f"{', '.join(f'{p:.0%}' for p in s['progress_points'])}")
    start = s["end"]
  ratio = samples_vs_baseline(stages, full_cost)
  print(f"for the same budget it trains on {ratio:.2f}x the samples of the uncompressed baseline "
        f"(the baseline's sample count would cost it {1 / ratio:.0%} of the budget)")
  print(f"wrote {out}; train with: --config.schedule_file={out}", flush=True)
  return text


def pilot(config, workdir: str) -> str:
  """The paper's procedure in one command: a short uncompressed run (pilot.budget_fraction of the
  budget) in WORKDIR/pilot with milestones at pilot.at_progress of its own budget, the gradient-error
  tables at those milestones, and the plan from them (WORKDIR/schedule.txt). A milestone at
  fraction p of the pilot stands for progress p of the full run (the pilot's lr and momentum
  schedules are the full run's, compressed in time)."""
  from vit_accel import grad_error, train
  from input_pipeline import pipeline

  pilot_config = config.copy_and_resolve_references()
  with pilot_config.unlocked():
    num_train = pipeline.load_source(config, "train").num_examples
    pilot_config.budget = float(config.pilot.budget_fraction) * train.budget_units(config, num_train)
    pilot_config.schedule = "none"
    pilot_config.schedule_file = ""
    pilot_config.checkpoint.at_progress = tuple(config.pilot.at_progress)
    pilot_config.eval.every_steps = 0
    pilot_config.eval.at_start = False
    pilot_config.eval.final_bank_size = config.eval.bank_size
    pilot_config.eval.final_query_size = config.eval.query_size
  pilot_dir = os.path.join(workdir, "pilot")
  train.train_and_evaluate(pilot_config, pilot_dir)
  plan = train.make_step_plan(pilot_config, num_train)
  with pilot_config.unlocked():
    pilot_config.grad_error.steps = tuple(sorted({plan.step_at_progress(f)
                                                  for f in config.pilot.at_progress}))
  grad_error.run(pilot_config, pilot_dir)
  with pilot_config.unlocked():
    pilot_config.plan.grad_error_file = os.path.join(pilot_dir, "grad_error.json")
  return run(pilot_config, workdir)
