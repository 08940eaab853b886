"""--mode=pilot: the paper's procedure in one command.

A short run (pilot.budget_fraction of the budget; uncompressed, or under the prior schedule with
pilot.train_schedule=prior) in WORKDIR/pilot with milestones at
pilot.at_progress of its own budget, the gradient-error tables at those milestones (--mode=grad_error
on WORKDIR/pilot), and the schedule searched from them (--mode=search: WORKDIR/schedule.txt). A
milestone at fraction p of the pilot stands for progress p of the full run (the pilot's lr and
momentum schedules are the full run's, compressed in time). The measurements spend at most
pilot.measure_fraction of the budget (measurement_plan: fewer batches and rounds at small budgets).
What the pilot spent (training and measurements, in budget units) goes to WORKDIR/pilot_cost.json
and schedule.txt's last comment, with the budget that is left: comparisons at equal total budget
train the searched schedule on it. With pilot.warm_start the searched run starts from the pilot's
final weights (pilot_cost.json's `init_workdir`, for --config.init.workdir), so the pilot's training
is not thrown away; its lr schedule and optimiser restart. With a prior schedule (search.prior) and a budget whose
measurements could not displace it (step_plan.prior_displaceable), the pilot trains and measures
nothing and the schedule is the prior, at no cost.
"""
from __future__ import annotations

import os
import shlex

import jax
from absl import logging

from input_pipeline import pipeline
from vit_accel import distributed, io, schedule_search, step_plan, train
from vit_accel.errors import UserError
from vit_accel.modes import Args, save_config
from vit_accel.modes import grad_error as grad_error_mode
from vit_accel.modes import search as search_mode


def trains_under_prior(config) -> bool:
  """pilot.train_schedule == "prior"; "none" for configs saved before the key existed."""
  return config.pilot.get("train_schedule", "none") == "prior"


def pilot_config(config, num_train: int):
  """The pilot run's config: on pilot.budget_fraction of the budget, the uncompressed schedule
  (pilot.train_schedule "none") or the prior's (search.prior, "prior"), milestones at
  pilot.at_progress, one evaluation at the end (at the periodic sizes)."""
  pilot = config.copy_and_resolve_references()
  with pilot.unlocked():
    pilot.budget = float(config.pilot.budget_fraction) * step_plan.budget_units(config, num_train)
    pilot.schedule = config.search.prior if trains_under_prior(config) else "none"
    pilot.schedule_file = ""
    pilot.checkpoint.at_progress = tuple(config.pilot.at_progress)
    pilot.eval.every_steps = 0
    pilot.eval.at_start = False
    pilot.eval.final_bank_size = config.eval.bank_size
    pilot.eval.final_query_size = config.eval.query_size
  return pilot


def measurement_plan(config, num_train: int) -> dict:
  """How much the pilot measures: {reference_batches, batches, max_rounds, cap_units,
  round_units} such that one round at every milestone fits in pilot.measure_fraction of the budget
  and at most max_rounds rounds do (grad_error.measure stops earlier once the pick is resolved).

  A round's cost does not depend on the budget (R + M batches of gradients per candidate), so at
  small budgets the configured grad_error.reference_batches (R) and batches (M) shrink together,
  to 2 each at least, and max_rounds falls; at large ones they are the configured values.
  Raises UserError, before anything trains, when even R = M = 2 does not fit.
  """
  ge = config.grad_error
  strategies = step_plan.candidates(config, "grad_error.candidates")
  milestones = len(config.pilot.at_progress)
  cap = float(config.pilot.measure_fraction) * step_plan.budget_units(config, num_train)
  per_milestone = cap / milestones
  units = lambda r, m: step_plan.measurement_units(config, strategies, r, m)  # noqa: E731
  per_r, per_m = units(1, 0), units(0, 1)   # units are linear in R and M
  r, m = int(ge.reference_batches), int(ge.batches)
  if units(r, m) > per_milestone and units(2, 2) <= per_milestone:
    # Both shrink by the same factor; where one is held at 2, the other takes what is left.
    r = max(2, int(r * per_milestone / units(r, m)))
    m = max(2, min(m, int((per_milestone - r * per_r) / per_m)))
    if units(r, m) > per_milestone:
      r = max(2, int((per_milestone - m * per_m) / per_r))
  if units(r, m) > per_milestone:
    raise UserError(
        f"pilot.measure_fraction={config.pilot.measure_fraction:g} of the budget "
        f"({cap:.4g} units) cannot pay for one gradient-error round of 2 + 2 batches at each of "
        f"{milestones} milestones ({units(2, 2) * milestones:.4g} units for "
        f"{len(strategies) - 1} candidates at batch {config.batch_size}); raise the budget or "
        f"pilot.measure_fraction, or measure fewer grad_error.candidates or pilot.at_progress")
  rounds = max(1, min(int(ge.max_rounds), int(per_milestone // units(r, m))))
  return {"reference_batches": r, "batches": m, "max_rounds": rounds, "cap_units": cap,
          "round_units": units(r, m)}


def run(config, workdir: str, args: Args = Args()) -> str:
  """The schedule string written to WORKDIR/schedule.txt."""
  del args
  step_plan.check_prior_measured(config, "grad_error.candidates")   # the config alone says so
  if trains_under_prior(config) and not config.search.prior:
    raise UserError("pilot.train_schedule=prior trains the pilot under search.prior, which is "
                    "empty; set search.prior (e.g. the recipe's preset) or "
                    "pilot.train_schedule=none")
  distributed.initialize(config)   # multi-host: before anything touches a device
  num_train = pipeline.load_source(config, "train").num_examples
  try:
    measure = measurement_plan(config, num_train)   # a budget too small fails before training
  except UserError:
    if step_plan.prior_stages(config) is None:
      raise
    # With a prior, no measurement at all is just the extreme of too few to displace it.
    measure = {"reference_batches": 0, "batches": 0, "max_rounds": 0}
  displaceable, needed = step_plan.prior_displaceable(
      config, "grad_error.candidates", measure["reference_batches"], measure["batches"],
      measure["max_rounds"])
  if not displaceable or not measure["max_rounds"]:
    return prior_without_pilot(config, workdir, num_train, measure, needed)
  logging.info("pilot measurements: R=%d reference and M=%d batches per candidate, at most %d "
               "round(s) per milestone (%.4g units each; cap %.4g units = pilot.measure_fraction)",
               measure["reference_batches"], measure["batches"], measure["max_rounds"],
               measure["round_units"], measure["cap_units"])
  pilot = pilot_config(config, num_train)
  with pilot.unlocked():
    pilot.grad_error.reference_batches = measure["reference_batches"]
    pilot.grad_error.batches = measure["batches"]
    pilot.grad_error.max_rounds = measure["max_rounds"]
  pilot_dir = os.path.join(workdir, "pilot")
  train.train_and_evaluate(pilot, pilot_dir)
  plan = step_plan.make_step_plan(pilot, num_train)
  with pilot.unlocked():
    pilot.grad_error.steps = tuple(sorted({plan.step_at_progress(f)
                                           for f in config.pilot.at_progress}))
  with pilot.unlocked():
    if not config.grad_error.cost_table:   # the run's own --mode=cost table, if it has one
      table = os.path.join(workdir, "cost_table.json")
      pilot.grad_error.cost_table = table if os.path.exists(table) else "none"
  measured = grad_error_mode.run(pilot, pilot_dir)
  with pilot.unlocked():
    pilot.search.grad_error_file = os.path.join(pilot_dir, "grad_error.json")
  text = search_mode.run(pilot, workdir)
  cost = pilot_cost(config, pilot, measured, num_train)
  # pilot.warm_start: the searched run starts from the pilot's final weights (train.initial_state).
  cost["warm_start"] = bool(config.pilot.warm_start)
  cost["init_workdir"] = os.path.abspath(pilot_dir) if config.pilot.warm_start else None
  flags = searched_run_flags(cost)
  if jax.process_index() == 0:
    io.atomic_write_json(os.path.join(workdir, "pilot_cost.json"), cost)
    with open(os.path.join(workdir, "schedule.txt"), "a") as f:
      if cost["remaining_units"] > 0:
        f.write(f"# the pilot spent {cost['total_units']:.4g} units ({cost['fraction']:.1%} of "
                f"the budget); charge it: {flags}\n")
      else:
        f.write(f"# the pilot spent {cost['total_units']:.4g} units, {cost['fraction']:.0%} of "
                f"the budget: nothing is left for the searched run at equal total budget\n")
  if cost["remaining_units"] <= 0:
    print(f"warning: the pilot spent {cost['fraction']:.0%} of the budget; at equal total budget "
          f"nothing is left for the searched schedule (lower pilot.budget_fraction or "
          f"pilot.measure_fraction)", flush=True)
    save_config(config, workdir, "pilot", primary=jax.process_index() == 0)
    return text
  print(f"the pilot spent {cost['total_units']:.4g} budget units ({cost['fraction']:.1%}: training "
        f"{cost['train_units']:.4g}, gradient-error measurements {cost['measurement_units']:.4g});"
        f" at equal total budget train the searched schedule with "
        f"{flags}", flush=True)
  save_config(config, workdir, "pilot", primary=jax.process_index() == 0)
  return text


def searched_run_flags(cost: dict) -> str:
  """The flags that train the searched schedule at equal total budget after a pilot that spent
  `cost` (pilot_cost.json): the budget it left and, with pilot.warm_start, the weights it ends
  with, e.g. `--config.budget=1.5e+06 --config.init.workdir=/runs/a/pilot` (shell-quoted)."""
  flags = f"--config.budget={cost['remaining_units']:.6g}"
  if cost.get("init_workdir"):
    flags += f" --config.init.workdir={shlex.quote(cost['init_workdir'])}"
  return flags


def prior_without_pilot(config, workdir: str, num_train: int, measure: dict, needed: int) -> str:
  """What the pilot does when the measurements the budget affords could not displace search.prior
  (step_plan.prior_displaceable): nothing is trained or measured, schedule.txt (and schedule.json)
  hold the prior, pilot_cost.json charges nothing. Buying measurements that cannot change the
  schedule would only take budget from training. The schedule is what --mode=search makes of
  unmeasured tables at pilot.at_progress (schedule_search.search_stages: the prior stands at every
  table), so search.final_full and search.monotone apply as they would to a measured prior.
  Returns the schedule string."""
  strategies = step_plan.candidates(config, "grad_error.candidates")
  prior = step_plan.prior_stages(config, [st.spec for st in strategies])
  rows = [{"strategy": st.spec, "cost_units": step_plan.step_cost_units(config, st)}
          for st in strategies]
  search = config.search
  stages = schedule_search.search_stages(
      [{"progress": float(p), "rows": rows} for p in config.pilot.at_progress],
      float(search.tie_tolerance), bool(search.final_full), search.ties, bool(search.monotone),
      prior, float(config.grad_error.ci_level))
  searched = [(s["end"], s["strategy"]) for s in stages]
  text = (search.prior if searched == prior
          else schedule_search.schedule_string(stages))   # a preset keeps its name
  challengers = len(strategies) - 1
  why = (f"the prior, unmeasured: at this budget pilot.measure_fraction="
         f"{config.pilot.measure_fraction:g} pays for {measure['reference_batches']} reference + "
         f"{measure['batches']} batches per candidate x {measure['max_rounds']} round(s), and "
         f"displacing the prior takes >= {needed} of each (against {challengers} other "
         f"candidate{'s' if challengers != 1 else ''} at grad_error.ci_level="
         f"{float(config.grad_error.ci_level):g}); raise the budget or "
         f"pilot.measure_fraction, or measure fewer grad_error.candidates")
  budget = step_plan.budget_units(config, num_train)
  cost = {"train_units": 0.0, "measurement_units": 0.0, "rounds": 0, "total_units": 0.0,
          "budget_units": budget, "fraction": 0.0, "remaining_units": budget, "measured": False,
          "warm_start": bool(config.pilot.warm_start),
          "init_workdir": None,   # no pilot trained: nothing to start from
          "needed_batches": needed,
          "measure": {"reference_batches": measure["reference_batches"],
                      "batches": measure["batches"], "max_rounds": measure["max_rounds"]}}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    stages = [dict(s, why=[why] if i == 0 else []) for i, s in enumerate(stages)]
    io.atomic_write_text(os.path.join(workdir, "schedule.txt"),
                         f"# {why}\n{text}\n# the pilot spent 0 units: train this schedule on the "
                         f"whole budget\n")
    io.atomic_write_json(os.path.join(workdir, "schedule.json"),
                         {"schedule": text, "grad_error_file": None,
                          "settings": {"prior": text}, "stages": stages})
    io.atomic_write_json(os.path.join(workdir, "pilot_cost.json"), cost)
  print(f"pilot: {why}", flush=True)
  save_config(config, workdir, "pilot", primary=jax.process_index() == 0)
  return text


def pilot_cost(config, pilot, measured: dict, num_train: int) -> dict:
  """Budget units the pilot spent: its training budget plus every gradient-error round it measured
  (step_plan.measurement_units per round), also as a fraction of the full budget and what is
  left of it (the budget the searched schedule gets at equal total compute)."""
  strategies = step_plan.candidates(pilot, "grad_error.candidates")
  per_round = step_plan.measurement_units(pilot, strategies, pilot.grad_error.reference_batches,
                                          pilot.grad_error.batches)
  rounds = sum(t["rows"][0].get("rounds", 1) for t in measured["tables"])
  budget = step_plan.budget_units(config, num_train)
  total = float(pilot.budget) + per_round * rounds
  return {"train_units": float(pilot.budget), "measurement_units": per_round * rounds,
          "rounds": rounds, "total_units": total, "budget_units": budget,
          "fraction": total / budget, "remaining_units": budget - total, "measured": True}
