"""--mode=pilot: the paper's procedure in one command.

A short uncompressed run (pilot.budget_fraction of the budget) in WORKDIR/pilot with milestones at
pilot.at_progress of its own budget, the gradient-error tables at those milestones (--mode=grad_error
on WORKDIR/pilot), and the schedule searched from them (--mode=search: WORKDIR/schedule.txt). A
milestone at fraction p of the pilot stands for progress p of the full run (the pilot's lr and
momentum schedules are the full run's, compressed in time).
"""
from __future__ import annotations

import os

import jax

from input_pipeline import pipeline
from vit_accel import distributed, step_plan, train
from vit_accel.modes import Args, save_config
from vit_accel.modes import grad_error as grad_error_mode
from vit_accel.modes import search as search_mode


def pilot_config(config, num_train: int):
  """The pilot run's config: the uncompressed schedule on pilot.budget_fraction of the budget,
  milestones at pilot.at_progress, one evaluation at the end (at the periodic sizes)."""
  pilot = config.copy_and_resolve_references()
  with pilot.unlocked():
    pilot.budget = float(config.pilot.budget_fraction) * step_plan.budget_units(config, num_train)
    pilot.schedule = "none"
    pilot.schedule_file = ""
    pilot.checkpoint.at_progress = tuple(config.pilot.at_progress)
    pilot.eval.every_steps = 0
    pilot.eval.at_start = False
    pilot.eval.final_bank_size = config.eval.bank_size
    pilot.eval.final_query_size = config.eval.query_size
  return pilot


def run(config, workdir: str, args: Args = Args()) -> str:
  """The schedule string written to WORKDIR/schedule.txt."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  num_train = pipeline.load_source(config, "train").num_examples
  pilot = pilot_config(config, num_train)
  pilot_dir = os.path.join(workdir, "pilot")
  train.train_and_evaluate(pilot, pilot_dir)
  plan = step_plan.make_step_plan(pilot, num_train)
  with pilot.unlocked():
    pilot.grad_error.steps = tuple(sorted({plan.step_at_progress(f)
                                           for f in config.pilot.at_progress}))
  grad_error_mode.run(pilot, pilot_dir)
  with pilot.unlocked():
    pilot.search.grad_error_file = os.path.join(pilot_dir, "grad_error.json")
  text = search_mode.run(pilot, workdir)
  save_config(config, workdir, "pilot", primary=jax.process_index() == 0)
  return text
