"""Accuracy against budget, baseline and accelerated, each tuned the same way: the paper's speed-up.

  python bench/budget_sweep.py --objective=mocov3            # ~3.5 hours on 2 CPU cores
  python bench/budget_sweep.py --objective=simclr --budgets=0.25,0.5,1
  python bench/budget_sweep.py --objective=mocov3 --report_only   # tables and plot from what ran

Three phases, one process, every run through main.py as a user would start it:
  1. tune: every arm (default: the uncompressed baseline `none` and the recipe's own accelerated
     schedule) at --tune_budget full-cost epochs over the grid base_lr x --lr_factors and batch
     --batches (the same grid for every arm); each arm's best setting = its highest final kNN.
  2. sweep: every arm at its own best setting at each of --budgets; arms other than the first also
     at --low_budgets, so that their curve reaches below the baseline's smallest budget.
  3. seeds: every arm at its best setting at --seed_budget with --extra_seeds.
Every run evaluates once, at its end, on one fixed protocol (kNN k=20 and a ridge linear probe on a
10k train / 5k test subset, full-length features).

Pausable: while WORKDIR_ROOT/PAUSE exists no new run starts (the current one finishes).
Resumable: each finished run is appended to bench/results/budget_sweep_<objective>.jsonl and
skipped when the sweep is started again; an interrupted run resumes from its checkpoint (its
workdir is kept under --workdir_root). After every run the report (.md, .json, .png) is rewritten
from the .jsonl, so a partial sweep always has a current table.

The speed-up is the paper's: for each budget B of the first arm (the baseline), the budget the
other arm needs to reach the baseline's final kNN at B, read from that arm's final-kNN-vs-budget
curve (linear in log budget between runs, `vit_accel.time_to_accuracy.budget_to_reach`; flagged when
extrapolated), and the training wall-clock it needs (interpolated the same way). Wall-clock comes
from each run's own clock (training only, evaluation and compilation excluded); the 1-minute load
average after each run is recorded, because two jobs on a 2-core machine slow each other.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import matplotlib
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sweep_runs import (  # noqa: E402  (bench/ is the script's directory)
  append,
  cpu_shared,
  define_flags,
  load,
  parse_arms,
  run_key,
  runner_from_flags,
  shared_legend,
  wall,
)

from vit_accel import io  # noqa: E402
from vit_accel import time_to_accuracy as tta  # noqa: E402

define_flags()
flags.DEFINE_list("arms", ["baseline=none", "accelerated=recipe"],
                  "NAME=SCHEDULE pairs; the first is the baseline whose final kNN is the target. "
                  "SCHEDULE: a preset, a stage string, a schedule file, 'recipe' (the "
                  "config's own) or 'pilot' (--mode=pilot, then its searched schedule on the "
                  "budget the pilot left: pilot included in the arm's budget and wall-clock; "
                  "it needs budgets that pay for its measurements, pilot.measure_fraction).")
flags.DEFINE_list("budgets", ["0.25", "0.5", "1", "2", "4"], "Full-cost epochs, every arm.")
flags.DEFINE_list("low_budgets", ["0.03125", "0.0625", "0.125"],
                  "Full-cost epochs run by every arm but the baseline (where it already beats "
                  "the baseline's smallest budget).")
flags.DEFINE_float("tune_budget", 0.25, "Budget (full-cost epochs) of the tuning grid.")
flags.DEFINE_list("lr_factors", ["0.5", "1", "2"], "Tuning grid: multiples of the recipe's "
                  "optim.base_lr.")
flags.DEFINE_list("batches", ["64", "128"], "Tuning grid: global batch sizes.")
flags.DEFINE_float("seed_budget", 0.5, "Budget of the extra-seed runs.")
flags.DEFINE_list("extra_seeds", ["1", "2"], "Seeds run at --seed_budget besides seed 0.")
flags.DEFINE_string("settings_from", "", "Instead of tuning: each arm's (base_lr, batch) from "
                    "this earlier sweep's report (.json, its `best`), e.g. the CPU sweep's for a "
                    "sweep on another machine; the tuning phase is skipped.")
flags.DEFINE_float("end_by", 0.0, "> 0: a Unix time every run must end by: a run starts only if "
                   "its predicted length (predicted_seconds) ends before it. Runs go in budget "
                   "order, so the largest are the ones left out; the report lists them.")
FLAGS = flags.FLAGS

def settings_from_report(path: str, arms) -> dict:
  """{arm: (base_lr, batch)} from an earlier sweep's report's `best`; exits with an error line when
  the file is unreadable or lacks a setting for one of `arms`."""
  try:
    with open(path) as f:
      best = json.load(f)["best"]
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"error: --settings_from={path}: no sweep report with a `best` ({e})")
  missing = [a for a, _ in arms if not best.get(a)]
  if missing:
    raise SystemExit(f"error: --settings_from={path} has no tuned setting for arm(s) {missing}")
  return {a: (float(best[a][0]), int(best[a][1])) for a, _ in arms}


def best_settings(records: list[dict], arms, grid) -> dict:
  """{arm: (base_lr, batch) or None}: --settings_from's, or each arm's best tuning-grid point."""
  if FLAGS.settings_from:
    return settings_from_report(FLAGS.settings_from, arms)
  return {a: best_setting(records, a, grid) for a, _ in arms}


def best_setting(records: list[dict], arm: str, grid: list[tuple[float, int]]
                 ) -> tuple[float, int] | None:
  """The grid point with the highest final kNN at the tuning budget, once the arm's grid is done."""
  done = {(r["base_lr"], r["batch_size"]): r["final_knn"] for r in records
          if r["arm"] == arm and r["budget_epochs"] == FLAGS.tune_budget and r["seed"] == 0}
  if any(point not in done for point in grid):
    return None
  return max(grid, key=lambda point: done[point])


def planned_runs(records: list[dict], arms: list[tuple[str, str]], grid) -> list[tuple]:
  """(arm, schedule, budget, lr, batch, seed) still to run, in order; later phases appear once the
  tuning grid they depend on is complete."""
  todo = [(a, s, FLAGS.tune_budget, lr, bs, 0) for a, s in arms for lr, bs in grid]
  best = best_settings(records, arms, grid)
  if all(best.values()):
    budgets = sorted({float(b) for b in FLAGS.budgets})
    low = sorted({float(b) for b in FLAGS.low_budgets})
    for budget in sorted(set(budgets) | set(low)):
      for i, (a, s) in enumerate(arms):
        if budget in budgets or i > 0:
          todo.append((a, s, budget, *best[a], 0))
    for seed in (int(x) for x in FLAGS.extra_seeds):
      for a, s in arms:
        todo.append((a, s, FLAGS.seed_budget, *best[a], seed))
  done = {r["key"] for r in records}
  return [t for t in todo if run_key(t[0], t[2], t[3], t[4], t[5]) not in done]


def predicted_seconds(records: list[dict], run: tuple) -> float:
  """How long `run` (a planned_runs entry) should take: the finished run of the same arm (else of
  any arm) nearest below its budget, its whole command's seconds scaled by the budget ratio (an
  overestimate: start-up and compilation do not grow with the budget); 0 with nothing to go by."""
  arm, budget = run[0], run[2]
  done = [r for r in records if r["budget_epochs"] <= budget and r.get("command_wall_s")]
  same = [r for r in done if r["arm"] == arm] or done
  if not same:
    return 0.0
  ref = max(same, key=lambda r: r["budget_epochs"])
  return ref["command_wall_s"] * budget / ref["budget_epochs"]


def tuned_curve(records: list[dict], arm: str, best: dict) -> list[dict]:
  """The arm's seed-0 runs at its tuned setting, by budget ([] until its grid is done)."""
  if not best.get(arm):
    return []
  rows = [r for r in records if r["arm"] == arm and r["seed"] == 0
          and (r["base_lr"], r["batch_size"]) == best[arm]]
  return sorted(rows, key=lambda r: r["budget_epochs"])


def speedups(records: list[dict], arms, best) -> list[dict]:
  """Per baseline budget: what each other arm needs (budget, wall-clock) to reach its final kNN."""
  base_name = arms[0][0]
  curve = lambda arm: tuned_curve(records, arm, best)  # noqa: E731

  out = []
  for base in curve(base_name):
    if base["budget_epochs"] not in {float(b) for b in FLAGS.budgets}:
      continue
    row = {"budget_epochs": base["budget_epochs"], "target": base["final_knn"],
           "baseline_wall_s": base["train_wall_s"], "baseline_cpu_shared": cpu_shared(base),
           "arms": {}}
    for arm, _ in arms[1:]:
      rows = curve(arm)
      if len(rows) < 2:
        continue
      pts = [(r["budget_epochs"], r["final_knn"]) for r in rows]
      got = tta.budget_to_reach(pts, base["final_knn"])
      entry = {"budget_epochs": got["budget"], "extrapolated": got["extrapolated"],
               "at_most": got["at_most"]}
      if got["budget"] is not None:
        (i, j) = got["bracket"]
        r0, r1 = rows[i], rows[j]
        if got["at_most"]:   # already above the target at its smallest run: bounds only
          r1 = r0
        # Wall-clock read off the same bracket, linear in log-log (wall ~ budget).
        span = math.log(r1["budget_epochs"]) - math.log(r0["budget_epochs"])
        t = (math.log(got["budget"]) - math.log(r0["budget_epochs"])) / span if span else 0.0
        wall = math.exp(math.log(r0["train_wall_s"]) + t * (math.log(r1["train_wall_s"])
                                                             - math.log(r0["train_wall_s"])))
        entry.update(wall_s=wall, speedup_budget=base["budget_epochs"] / got["budget"],
                     speedup_wall=base["train_wall_s"] / wall,
                     cpu_shared=cpu_shared(base) or cpu_shared(r0) or cpu_shared(r1))
      row["arms"][arm] = entry
    out.append(row)
  return out


def seed_spread(records, arms, best) -> dict:
  out = {}
  for arm, _ in arms:
    if not best.get(arm):
      continue
    rows = [r for r in records if r["arm"] == arm and r["budget_epochs"] == FLAGS.seed_budget
            and (r["base_lr"], r["batch_size"]) == best[arm]]
    if len(rows) >= 2:
      knn = [r["final_knn"] for r in rows]
      out[arm] = {"seeds": sorted(r["seed"] for r in rows), "knn": knn,
                  "mean": statistics.mean(knn), "std": statistics.stdev(knn),
                  "range": max(knn) - min(knn)}
  return out


def plot(records, arms, best, rows, path) -> None:
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for arm, schedule in arms:
    pts = [(r["budget_epochs"], r["final_knn"]) for r in tuned_curve(records, arm, best)]
    if pts:
      line, = ax.plot(*zip(*pts), marker="o", label=f"{arm} ({schedule})")
      seeds = [(r["budget_epochs"], r["final_knn"]) for r in records if r["arm"] == arm
               and r["seed"] != 0]
      if seeds:
        ax.scatter(*zip(*seeds), marker="x", color=line.get_color(), label=f"{arm}, other seeds")
  for row in rows:
    for arm, e in row["arms"].items():
      if e.get("speedup_budget"):
        ax.annotate("", xy=(e["budget_epochs"], row["target"]),
                    xytext=(row["budget_epochs"], row["target"]),
                    arrowprops=dict(arrowstyle="->", color="grey", lw=0.8))
        ax.text(math.sqrt(e["budget_epochs"] * row["budget_epochs"]), row["target"] + 0.002,
                (">=" if e["at_most"] else "") + f"{e['speedup_budget']:.1f}x"
                + ("*" if e["extrapolated"] else ""),
                ha="center", va="bottom", fontsize=8, color="grey")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("budget (full-cost epochs)")
  ax.set_ylabel("final kNN top-1")
  ax.grid(alpha=0.3, which="both")
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(f"{FLAGS.objective}: final kNN vs budget, each arm at its tuned setting"
               "\n(arrows: budget the accelerated arm needs for the baseline's kNN; * extrapolated)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fmt(x, spec=".4f", none="-"):
  return none if x is None else format(x, spec)


def report(records: list[dict], arms, grid, stem: str, not_started=()) -> None:
  best = best_settings(records, arms, grid)
  rows = speedups(records, arms, best)
  spread = seed_spread(records, arms, best)
  plot(records, arms, best, rows, stem + ".png")
  machines = sorted({r["machine"] for r in records})
  lines = [f"# Budget sweep: {FLAGS.objective}", "",
           f"Written by `python bench/budget_sweep.py {' '.join(sys.argv[1:])}` on "
           f"{time.strftime('%Y-%m-%d')}; {len(records)} runs so far. Machine(s): "
           f"{'; '.join(machines)}. Every run: the embedded recipe (configs/fmnist_"
           f"{FLAGS.objective}.py), evaluated once at its end on one protocol (kNN k=20 and a "
           "ridge probe, 10k train / 5k test images). Wall-clock = training only.", "",
           "## Tuning grid", "",
           (f"Not tuned here: each arm's (base_lr, batch) is the one tuned in {FLAGS.settings_from}"
            f" ({', '.join(f'{a} {lr:g} / {bs}' for a, (lr, bs) in best.items())})."
            if FLAGS.settings_from else
            f"Budget {FLAGS.tune_budget:g} full-cost epochs, seed 0; each arm then runs at its "
            "best setting (bold) at every budget."), "",
           "| arm | base_lr | batch | final kNN | final linear | train wall |",
           "|---|---:|---:|---:|---:|---:|"]
  for arm, _ in arms:
    for lr, bs in grid:
      r = next((r for r in records if r["key"] == run_key(arm, FLAGS.tune_budget, lr, bs, 0)),
               None)
      if r is None:
        lines.append(f"| {arm} | {lr:g} | {bs} | not run yet | | |")
        continue
      mark = "**" if best[arm] == (lr, bs) else ""
      lines.append(f"| {arm} | {lr:g} | {bs} | {mark}{r['final_knn']:.4f}{mark} | "
                   f"{fmt(r['final_linear'])} | {wall(r)} |")
  lines += ["", "## Final kNN against budget (seed 0, tuned settings)", "",
            "| arm | budget (epochs) | steps | stages | final kNN | final linear | train wall | "
            "load avg |", "|---|---:|---:|---|---:|---:|---:|---:|"]
  for arm, _ in arms:
    for r in tuned_curve(records, arm, best):
      stages = "; ".join(r["stages"]).replace("|", "\\|")
      lines.append(f"| {arm} | {r['budget_epochs']:g} | {r['steps']} | {stages} | "
                   f"{r['final_knn']:.4f} | {fmt(r['final_linear'])} | "
                   f"{wall(r)} | {r['load_avg_1m']:.1f} |")
  lines += ["", "## Speed-up: budget to reach the baseline's final kNN", "",
            "| baseline budget | baseline kNN | baseline wall | arm | budget needed | wall needed | "
            "speed-up (budget) | speed-up (wall) |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
  for row in rows:
    for arm, e in row["arms"].items():
      flag = f" (extrapolated {e['extrapolated']})" if e["extrapolated"] else ""
      le, ge = ("<= ", ">= ") if e["at_most"] else ("", "")
      if e["budget_epochs"] is None:
        lines.append(f"| {row['budget_epochs']:g} | {row['target']:.4f} | "
                     f"{row['baseline_wall_s']:.0f} s | {arm} | not reached | | | |")
        continue
      star = "*" if e["cpu_shared"] else ""
      lines.append(f"| {row['budget_epochs']:g} | {row['target']:.4f} | "
                   f"{row['baseline_wall_s']:.0f} s | {arm} | {le}{e['budget_epochs']:.3g}{flag} | "
                   f"{le}{e['wall_s']:.0f} s | {ge}{e['speedup_budget']:.2f}x | "
                   f"{ge}{e['speedup_wall']:.2f}x{star} |")
  lines += shared_legend(records, derived=True)
  lines += ["", f"## Seed spread at {FLAGS.seed_budget:g} epochs", "",
            "| arm | seeds | final kNN | mean | std | range |", "|---|---|---|---:|---:|---:|"]
  for arm, s in spread.items():
    lines.append(f"| {arm} | {', '.join(map(str, s['seeds']))} | "
                 f"{', '.join(f'{k:.4f}' for k in s['knn'])} | {s['mean']:.4f} | "
                 f"{s['std']:.4f} | {s['range']:.4f} |")
  if not_started:
    lines += ["", "Not run (predicted to end after --end_by): "
              + ", ".join(run_key(t[0], *t[2:]) for t in not_started) + "."]
  lines += ["", f"![final kNN vs budget]({os.path.basename(stem)}.png)", ""]
  io.atomic_write_text(stem + ".md", "\n".join(lines))
  io.atomic_write_json(stem + ".json", {"objective": FLAGS.objective, "arms": arms,
                                        "best": {a: list(b) if b else None
                                                 for a, b in best.items()},
                                        "speedups": rows, "seed_spread": spread,
                                        "not_started": [run_key(t[0], *t[2:])
                                                        for t in not_started],
                                        "runs": records})


def main(argv):
  del argv
  arms = parse_arms(FLAGS.arms)
  runner = runner_from_flags()
  base_lr = float(runner.recipe_config().optim.base_lr)
  grid = ([] if FLAGS.settings_from else
          [(base_lr * float(f), int(b)) for f in FLAGS.lr_factors for b in FLAGS.batches])
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stem = os.path.join(FLAGS.out_dir, f"budget_sweep_{FLAGS.objective}"
                      + (f"_{FLAGS.tag}" if FLAGS.tag else ""))
  records = load(stem + ".jsonl")
  if FLAGS.dry_run:
    for run in planned_runs(records, arms, grid):
      print(run_key(run[0], *run[2:]), run[1])
    return
  not_started = []
  while not FLAGS.report_only:
    todo = planned_runs(records, arms, grid)
    if not todo:
      break
    if FLAGS.end_by > 0 and time.time() + predicted_seconds(records, todo[0]) > FLAGS.end_by:
      not_started = todo
      print(f"out of time: {len(todo)} run(s) not started", flush=True)
      break
    runner.wait_while_paused()
    record = runner.run(*todo[0])
    append(stem + ".jsonl", record)
    records.append(record)
    report(records, arms, grid, stem)
  report(records, arms, grid, stem, not_started)
  print(open(stem + ".md").read(), flush=True)


if __name__ == "__main__":
  app.run(main)
