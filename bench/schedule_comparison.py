"""Does the measured schedule earn its place? Searched and online schedules against the hand-set
preset and the uncompressed baseline, at equal total budget, with the seed-to-seed noise measured.

  python bench/schedule_comparison.py --objective=mocov3                 # after budget_sweep's grid
  python bench/schedule_comparison.py --objective=simclr --budgets=1,2 --seeds=0,1

Arms (--arms, NAME=SCHEDULE): `baseline=none`, `accelerated=recipe` (the recipe's hand-set preset),
`searched=pilot` (--mode=pilot: an uncompressed pilot on pilot.budget_fraction of the budget, the
gradient error at its milestones, the schedule search; then the searched schedule on the budget the
pilot left, so the pilot's units and wall-clock are in the arm's) and `online=online` (CA-MSE
re-measured during training, the measurements charged to the budget). Every arm runs at every
--budgets and --seeds; the report shows the runs of those arms, budgets and seeds.

--arm_overrides=ARM:KEY=VALUE (repeatable) sets a config key for one arm (e.g. the search without
its prior schedule: `--arms=...,searched_noprior=pilot --arm_overrides=searched_noprior:search.prior=`).

Settings: --settings=sweep takes each arm's base_lr and batch from bench/budget_sweep.py's tuning
grid in the same .jsonl (the baseline its own; every compressed arm the accelerated arm's, the
setting tuned for the preset: if anything, the preset's advantage); --settings=recipe runs every
arm at the recipe's own. Runs are shared with the budget sweep (same .jsonl, same keys and
workdirs), so the baseline and preset runs it already has are not run again.

Verdict per budget: an arm's mean final kNN against the preset's, over the seeds both have run
(at least two); the noise is the largest seed-to-seed range among the fixed-schedule arms
(baseline, preset), each over all its own seeds, at that budget (measured, not assumed; a searched
or online arm's seeds also differ in what they chose). "above": more than the noise above the
preset; "within noise"; "below": more than the noise below.

A seed for some arms only (to pin the noise down where a verdict is close), in two steps: run it
with an out_dir holding a copy of the .jsonl (that run's report shows only what it ran), e.g.
`--seeds=2 --arms=accelerated=recipe,online=online`; append its records to the .jsonl here and
rewrite the report with every arm, `--seeds=0,1,2 --report_only`. The other arms keep their
difference to the preset (over their own seeds); the noise, over every seed of a fixed arm, can
only grow.

Pausable and resumable as the budget sweep (sweep_runs): WORKDIR_ROOT/PAUSE holds the next run;
finished runs are skipped; the report (schedule_comparison_<objective>.{md,json}, and each searched
run's schedule.txt with its reasons) is rewritten after every run.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

from absl import app, flags
from sweep_runs import (  # bench/ is the script's directory
  MEASURED,
  Runner,
  append,
  define_flags,
  load,
  parse_arms,
  run_key,
  runner_from_flags,
  same_rules,
  shared_legend,
  wall,
)

from vit_accel import io  # (sweep_runs put the repository on sys.path)

define_flags()
flags.DEFINE_list("arms", ["baseline=none", "accelerated=recipe", "searched=pilot",
                           "online=online"],
                  "NAME=SCHEDULE pairs (see the module docstring); the arm named 'accelerated' "
                  "is the preset the others are compared with.")
flags.DEFINE_multi_string("arm_overrides", [], "ARM:KEY=VALUE, repeatable: a --config "
                          "override for one arm only (after --extra), e.g. "
                          "searched_noprior:search.prior= for the search without its prior "
                          "schedule (one flag per item: a value may hold commas).")
flags.DEFINE_list("budgets", ["1", "2"], "Full-cost epochs (the pilot's measurements need a "
                  "budget that pays for them: pilot.measure_fraction).")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every arm at every budget.")
flags.DEFINE_enum("settings", "sweep", ["sweep", "recipe"],
                  "base_lr and batch: the budget sweep's tuned ones, or the recipe's.")
FLAGS = flags.FLAGS

PRESET = "accelerated"


def tuned_settings(runner: Runner, sweep_report: str) -> dict:
  """{'baseline': (lr, batch), 'compressed': (lr, batch)}: the budget sweep's best grid points
  (its report's `best`, set once an arm's grid is complete) for its baseline and accelerated arms,
  or the recipe's own (--settings=recipe); exits with an error line when the grid is not done."""
  if FLAGS.settings == "recipe":
    config = runner.recipe_config()
    own = (float(config.optim.base_lr), int(config.batch_size))
    return {"baseline": own, "compressed": own}
  best = {}
  if os.path.exists(sweep_report):
    with open(sweep_report) as f:
      best = json.load(f).get("best", {})
  missing = [arm for arm in ("baseline", PRESET) if not best.get(arm)]
  if missing:
    raise SystemExit(f"error: the budget sweep's tuning grid for {' and '.join(missing)} is not "
                     f"complete in {sweep_report}; run bench/budget_sweep.py "
                     f"--objective={FLAGS.objective} first, or pass --settings=recipe")
  return {"baseline": tuple(best["baseline"]), "compressed": tuple(best[PRESET])}


def planned_runs(arms, settings) -> list[tuple]:
  """(arm, schedule, budget, lr, batch, seed) of the comparison, budget-major (every arm and seed
  at the smallest budget first: a partial comparison has whole verdicts)."""
  runs = []
  for budget in sorted(float(b) for b in FLAGS.budgets):
    for seed in (int(s) for s in FLAGS.seeds):
      for arm, schedule in arms:
        lr, bs = settings["baseline" if arm == "baseline" else "compressed"]
        runs.append((arm, schedule, budget, lr, bs, seed))
  return runs


def arm_overrides(arm: str) -> tuple[str, ...]:
  """The --arm_overrides of `arm` ('KEY=VALUE' items); SystemExit with an error line for an item
  that is not ARM:KEY=VALUE."""
  out = []
  for item in FLAGS.arm_overrides:
    name, sep, override = item.partition(":")
    if not sep or "=" not in override:
      raise SystemExit(f"error: --arm_overrides wants ARM:KEY=VALUE items, got {item!r}")
    if name == arm:
      out.append(override)
  return tuple(out)


def find(records, run) -> dict | None:
  """The finished record of `run`: same key, schedule and overrides (--extra, then the arm's
  --arm_overrides; a budget-sweep run of the same name but another schedule or other overrides is
  not this run, nor is a measured arm's run chosen under other rules: sweep_runs.same_rules)."""
  key = run_key(run[0], *run[2:])
  extra = list(FLAGS.extra) + list(arm_overrides(run[0]))
  return next((r for r in records if r["key"] == key and r["schedule"] == run[1]
               and r.get("extra", []) == extra and same_rules(r)), None)


def compare(records, arms, settings) -> list[dict]:
  """[{"budget_epochs", "noise", "arms": {arm: {...}}}] per --budgets: for each arm of `arms`
  ((name, schedule) pairs) with a finished record in `records` (the .jsonl's dicts; the runs
  planned with `settings` for --seeds, found by `find`), its seeds, final kNN and linear probe per
  seed, mean, stages, reasons and walls; the noise (the largest seed range of a fixed schedule);
  and for every arm but the preset its difference to the preset on the seeds both ran, with a
  verdict (paired_verdict)."""
  out = []
  runs = planned_runs(arms, settings)
  for budget in sorted(float(b) for b in FLAGS.budgets):
    row = {"budget_epochs": budget, "arms": {}}
    for arm, schedule in arms:
      done = [r for r in (find(records, run) for run in runs
                          if run[0] == arm and run[2] == budget) if r]
      if not done:
        continue
      knn = [r["final_knn"] for r in done]
      row["arms"][arm] = {
          "schedule": schedule, "seeds": [r["seed"] for r in done], "knn": knn,
          "linear": [r.get("final_linear") for r in done], "mean": statistics.mean(knn),
          "range": max(knn) - min(knn) if len(knn) > 1 else None,
          "stages": {r["seed"]: r["stages"] for r in done},
          "why": {r["seed"]: r.get("why", []) for r in done},
          "pilot": [(r["pilot_fraction"], r.get("pilot_measure"), r.get("pilot_needed"))
                    for r in done if r.get("pilot_fraction") is not None],
          "wall": [wall(r) for r in done], "keys": [r["key"] for r in done]}
    # Run-to-run noise from the fixed schedules only: a measured arm's seeds may also differ in
    # the schedule they chose, a spread that belongs to the procedure, not to the noise.
    ranges = [e["range"] for e in row["arms"].values()
              if e["range"] is not None and e["schedule"] not in MEASURED]
    row["noise"] = max(ranges) if ranges else None
    preset = row["arms"].get(PRESET)
    for arm, e in row["arms"].items():
      if preset is None or arm == PRESET:
        continue
      e.update(paired_verdict(dict(zip(e["seeds"], e["knn"])),
                              dict(zip(preset["seeds"], preset["knn"])), row["noise"]))
    out.append(row)
  return out


def paired_verdict(knn: dict, preset_knn: dict, noise: float | None) -> dict:
  """An arm against the preset on the seeds both have run (`knn`, `preset_knn`: {seed: final
  kNN}), so an arm is never compared with a mean over seeds it lacks: a seed added to some arms
  only leaves the others' differences as they were. Returns {"diff": the arm's mean minus the
  preset's over those seeds (absent when they share none), "diff_seeds": those seeds, sorted,
  "every_seed": whether they are every seed of both (a report names them where not), "verdict"}:
  "above" / "within noise" / "below" against `noise` (kNN points; the largest seed range of a
  fixed schedule), or "one seed in common: no verdict", "no seed in common", or "noise not
  measured" (`noise` None)."""
  shared = sorted(set(knn) & set(preset_knn))
  every_seed = shared == sorted(knn) == sorted(preset_knn)
  if not shared:
    return {"diff_seeds": [], "every_seed": every_seed, "verdict": "no seed in common"}
  diff = (statistics.mean(knn[s] for s in shared)
          - statistics.mean(preset_knn[s] for s in shared))
  if len(shared) < 2:
    verdict = "one seed in common: no verdict"
  elif noise is None:
    verdict = "noise not measured"
  elif diff > noise:
    verdict = "above"
  elif diff >= -noise:
    verdict = "within noise"
  else:
    verdict = "below"
  return {"diff": diff, "diff_seeds": shared, "every_seed": every_seed, "verdict": verdict}


def merged(stages: list[str]) -> list[str]:
  """'SPEC xN' stages with neighbours of one spec merged (an online run lists every segment)."""
  out = []
  for stage in stages:
    spec, _, n = stage.rpartition(" x")
    if out and out[-1][0] == spec:
      out[-1][1] += int(n)
    else:
      out.append([spec, int(n)])
  return [f"{spec} x{n}" for spec, n in out]


def report(records, arms, settings, stem: str, runner: Runner) -> None:
  """Writes `stem`.md (the table of `compare`, the noise, the reasons of every measured run) and
  `stem`.json, and copies each searched run's plan file (runner's workdir/schedule.txt) to `stem`/."""
  rows = compare(records, arms, settings)
  lines = [f"# Schedules compared: {FLAGS.objective}", "",
           f"Written by `python bench/schedule_comparison.py {' '.join(sys.argv[1:])}` on "
           f"{time.strftime('%Y-%m-%d')}. Every run: the embedded recipe (configs/fmnist_"
           f"{FLAGS.objective}.py), evaluated once at its end (kNN k=20 and a ridge probe, 10k "
           "train / 5k test images). Equal total budget: a searched run's budget includes its "
           "pilot (uncompressed training + gradient-error measurements), an online run's its "
           "measurements. Settings (base_lr, batch): baseline "
           f"{settings['baseline']}, every compressed arm {settings['compressed']} "
           f"({'the budget sweep' if FLAGS.settings == 'sweep' else 'the recipe'}'s).", "",
           "| budget (epochs) | arm | final kNN per seed | mean | vs preset | verdict | "
           "schedule per seed (stages x steps) | pilot share (R, M, rounds) | train wall |",
           "|---:|---|---|---:|---:|---|---|---:|---|"]
  for row in rows:
    for arm, e in row["arms"].items():
      knn = ", ".join(f"{k:.4f} (s{s})" for k, s in zip(e["knn"], e["seeds"]))
      shown = {seed: "; ".join(merged(st)) for seed, st in e["stages"].items()}
      stages = (next(iter(shown.values())) if len(set(shown.values())) == 1 else
                " / ".join(f"s{seed}: {text}" for seed, text in shown.items())).replace("|", "\\|")
      diff = f"{e['diff']:+.4f}" if "diff" in e else ""
      if diff and not e["every_seed"]:
        diff += " (" + ", ".join(f"s{s}" for s in e["diff_seeds"]) + ")"   # not all of them
      pilot = ", ".join(f"{share:.0%}" + (f" ({m['reference_batches']}, {m['batches']}, "
                                         f"<={m['max_rounds']})" if m else "")
                        + (f": unmeasured, the prior (needs {needed})" if needed else "")
                        for share, m, needed in e["pilot"])
      lines.append(f"| {row['budget_epochs']:g} | {arm} | {knn} | {e['mean']:.4f} | {diff} | "
                   f"{e.get('verdict', '')} | {stages} | {pilot} | {', '.join(e['wall'])} |")
  lines += ["", "vs preset: the arm's mean final kNN minus the preset's, over the seeds both ran "
            "(listed where that is not every seed of both)."]
  lines += ["", "Noise (largest seed-to-seed range of final kNN among the fixed-schedule arms, "
            "per budget; a measured arm's own range, which includes its different choices per "
            "seed, is not noise): "
            + ", ".join(f"{r['budget_epochs']:g} epochs: "
                        + (f"{r['noise']:.4f}" if r["noise"] is not None else "not yet measured")
                        for r in rows) + "."]
  shown = {key for row in rows for e in row["arms"].values() for key in e["keys"]}
  lines += shared_legend([r for r in records if r["key"] in shown])
  lines += ["", "## Why each measured schedule is what it is", ""]
  copies = os.path.join(os.path.dirname(stem), os.path.basename(stem))
  for row in rows:
    for arm, e in row["arms"].items():
      for seed, why in e["why"].items():
        if not why:
          continue
        key = e["keys"][e["seeds"].index(seed)]
        lines.append(f"**{arm}, {row['budget_epochs']:g} epochs, seed {seed}** "
                     f"({'; '.join(merged(e['stages'][seed]))}):")
        # one line per reason (a pilot that measured nothing gives the same one for every stage)
        lines += [f"- {line}" for line in dict.fromkeys(why)] + [""]
        searched = os.path.join(runner.workdir(key), "schedule.txt")
        if os.path.exists(searched):   # the plan file itself, reasons in its comment lines
          os.makedirs(copies, exist_ok=True)
          shutil.copyfile(searched, os.path.join(copies, f"{key}.schedule.txt"))
  io.atomic_write_text(stem + ".md", "\n".join(lines) + "\n")
  io.atomic_write_json(stem + ".json", {"objective": FLAGS.objective, "arms": arms,
                                        "settings": settings, "budgets": rows})


def main(argv):
  del argv
  arms = parse_arms(FLAGS.arms)
  if PRESET not in [a for a, _ in arms]:
    raise app.UsageError(f"--arms needs the preset arm '{PRESET}' to compare with")
  for item in FLAGS.arm_overrides:
    arm_overrides(item.partition(":")[0])   # the form is checked there
    if item.partition(":")[0] not in [a for a, _ in arms]:
      raise SystemExit(f"error: --arm_overrides item {item!r} names no arm of --arms")
  runner = runner_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  suffix = FLAGS.objective + (f"_{FLAGS.tag}" if FLAGS.tag else "")
  records_path = os.path.join(FLAGS.out_dir, f"budget_sweep_{suffix}.jsonl")
  stem = os.path.join(FLAGS.out_dir, f"schedule_comparison_{suffix}")
  records = load(records_path)
  settings = tuned_settings(runner, os.path.join(FLAGS.out_dir, f"budget_sweep_{suffix}.json"))
  todo = [run for run in planned_runs(arms, settings) if find(records, run) is None]
  if FLAGS.dry_run:
    for run in todo:
      print(run_key(run[0], *run[2:]), run[1])
    return
  failed = []
  for run in [] if FLAGS.report_only else todo:
    runner.wait_while_paused()
    try:
      record = runner.run(*run, overrides=arm_overrides(run[0]))
    except SystemExit as e:   # e.g. a budget too small for the pilot: the other runs go on
      failed.append(f"{run_key(run[0], *run[2:])}: {e}")
      print(f"{failed[-1]}; going on with the next run", flush=True)
      continue
    append(records_path, record)
    records.append(record)
    report(records, arms, settings, stem, runner)
  report(records, arms, settings, stem, runner)
  print(open(stem + ".md").read(), flush=True)
  if failed:
    raise SystemExit("error: these runs failed (not in the report; the error line of each is "
                     "above):\n  " + "\n  ".join(failed))


if __name__ == "__main__":
  app.run(main)
