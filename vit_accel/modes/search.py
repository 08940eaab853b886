"""--mode=search: a compression schedule from the gradient-error tables of --mode=grad_error
(schedule_search.py) -> WORKDIR/schedule.txt, which training reads with
--config.schedule_file=WORKDIR/schedule.txt (its comment lines say why each interval's strategy
was chosen; WORKDIR/schedule.json holds the same with the settings). Reads `search.grad_error_file` (default
WORKDIR/grad_error.json) and weighs the tables against `search.prior`; compiles nothing and needs no
TensorFlow."""
from __future__ import annotations

import json
import os

from vit_accel import io, schedule_search, step_plan
from vit_accel.errors import UserError
from vit_accel.modes import Args


def read_tables(path: str) -> list[dict]:
  """The tables of a grad_error.json; UserError when it is missing or unreadable."""
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; run --mode=grad_error on this workdir first (or set "
                    f"search.grad_error_file)")
  try:
    with open(path) as f:
      return json.load(f)["tables"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is not a readable grad_error.json ({type(e).__name__}: {e}); "
                    f"re-run --mode=grad_error") from None


def run(config, workdir: str, args: Args = Args()) -> str:
  """The schedule string written to WORKDIR/schedule.txt."""
  del args
  search = config.search
  path = search.grad_error_file or os.path.join(workdir, "grad_error.json")
  tables = read_tables(path)
  # Spelled as the tables' rows: tables measured under candidates spelled otherwise (or before
  # the config's candidates changed) still name the prior's rows.
  prior = step_plan.prior_stages(config, [r["strategy"] for r in tables[0]["rows"]])
  stages = schedule_search.search_stages(tables, float(search.tie_tolerance),
                                         bool(search.final_full), search.ties,
                                         bool(search.monotone), prior,
                                         float(config.grad_error.ci_level))
  text = schedule_search.schedule_string(stages)
  full_cost = next(r["cost_units"] for r in tables[0]["rows"] if r["strategy"] == "full")
  out = os.path.join(workdir, "schedule.txt")
  os.makedirs(workdir, exist_ok=True)
  why = [line for s in stages for line in s["why"]]
  settings = {"prior": search.prior, "ties": search.ties,
              "tie_tolerance": float(search.tie_tolerance),
              "monotone": bool(search.monotone), "final_full": bool(search.final_full),
              "ci_level": float(config.grad_error.ci_level)}
  io.atomic_write_text(out, f"# found by --mode=search from {path} ({settings})\n"
                       + "".join(f"# {line}\n" for line in why) + f"{text}\n")
  io.atomic_write_json(os.path.join(workdir, "schedule.json"),
                       {"schedule": text, "grad_error_file": path, "settings": settings,
                        "stages": stages})
  print("searched schedule (budget fraction where each stage ends : strategy):")
  start = 0.0
  for s in stages:
    print(f"  {start:5.1%} - {s['end']:5.1%}  {s['strategy']:<22} cost {s['cost_units']:.2f} units"
          f"/sample ({s['cost_units'] / full_cost:.2f} of full); "
          + (f"chosen at progress {', '.join(f'{p:.0%}' for p in s['progress_points'])}"
             if s["progress_points"] else "the prior's, where it stood"))
    start = s["end"]
  ratio = schedule_search.samples_vs_baseline(stages, full_cost)
  print(f"for the same budget it trains on {ratio:.2f}x the samples of the uncompressed baseline "
        f"(the baseline's sample count would cost it {1 / ratio:.0%} of the budget)")
  for line in why:
    print(f"  why: {line}")
  print(f"wrote {out} (and schedule.json: every interval's choice and why); train with: "
        f"--config.schedule_file={out}", flush=True)
  return text
