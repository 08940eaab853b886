"""--mode=grad_error: the gradient-error tables (vit_accel/grad_error.py) at the checkpoints of the run
in WORKDIR -> WORKDIR/grad_error.json, and their heat-map WORKDIR/grad_error.png (strategies x
budget progress).

Steps analysed: `grad_error.steps`, or by default the run's milestones (checkpoint.at_progress)
when it kept some, else its rolling checkpoints. At each, the batches are the ones the run would
have trained on next (the training stream from that step): R for the reference g*, then the same
M for every strategy, and again with the stream's next batches for each further round.
"""
from __future__ import annotations

import json
import os
import time

import jax
from absl import logging

from input_pipeline import streams
from vit_accel import (
  checkpointing,
  config_checks,
  distributed,
  grad_error,
  io,
  report,
  rng_streams,
  run_setup,
  schedule_search,
  step_plan,
)
from vit_accel.compression import BranchStrategies
from vit_accel.errors import UserError
from vit_accel.modes import Args, save_config


def saved_steps(workdir: str) -> dict[int, str]:
  """step -> checkpoint directory, over the rolling checkpoints and the milestones."""
  found = {}
  for sub in (checkpointing.MILESTONES, "checkpoints"):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory):
      for name in os.listdir(directory):
        if name.isdigit():
          found.setdefault(int(name), directory)
  return found


def steps_to_analyse(config, workdir: str, available: dict[int, str]) -> list[int]:
  """`grad_error.steps`, else the milestones when the run kept some (they span the run), else the
  rolling checkpoints; UserError when nothing is saved or a requested step is not."""
  if not available:
    raise UserError(f"no checkpoints in {workdir}/checkpoints or {workdir}/"
                    f"{checkpointing.MILESTONES}; train first (checkpoint.at_progress keeps "
                    f"checkpoints at chosen budget fractions)")
  milestones = {s for s, d in available.items() if d.endswith(checkpointing.MILESTONES)}
  if len(config.grad_error.steps):
    steps = sorted(int(s) for s in config.grad_error.steps)
  else:
    steps = sorted(milestones or available)
  missing = [s for s in steps if s not in available]
  if missing:
    raise UserError(f"grad_error.steps {missing} not saved in {workdir}; saved: "
                    f"{', '.join(map(str, sorted(available)))}")
  return steps


def restore(directory: str, step: int, target):
  """The state saved at `step` in `directory`, read-only; a config of other shapes is one line
  (UserError) and nothing is read."""
  ckpt = checkpointing.Checkpointer(directory, keep=None, every_steps=1, async_save=False,
                                    read_only=True)
  try:
    ckpt.check_compatible(step, target)
    return ckpt.restore(step, target)[0]
  finally:
    ckpt.close()


def measured_cost_ratios(config, workdir: str, strategies) -> dict | None:
  """{strategy: measured step time / full-length step time} from --mode=cost's table
  (`grad_error.cost_table`, "" = WORKDIR/cost_table.json if there), when it has every candidate;
  None (the analytic cost model) when there is none or `grad_error.cost_table=none`. A table that
  lacks a candidate is logged and not used (one source for every row). UserError: a named table
  that does not exist or cannot be read."""
  path = config.grad_error.cost_table
  if path == "none":
    return None
  if not path:
    path = os.path.join(workdir, "cost_table.json")
    if not os.path.exists(path):
      return None
  try:
    with open(path) as f:
      rows = {BranchStrategies.parse(r["strategy"], config.compression.bucket).spec: r
              for r in json.load(f)}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"grad_error.cost_table={path!r} is not a readable --mode=cost table "
                    f"({type(e).__name__}: {e})") from None
  missing = [st.spec for st in strategies if st.spec not in rows]
  if missing:
    logging.warning("cost table %s lacks %s: CA-MSE uses the analytic cost model", path,
                    ", ".join(missing))
    return None
  full = rows[strategies[0].spec]["ms_per_step"]
  logging.info("CA-MSE weighs variance by the step times measured in %s", path)
  return {st: rows[st.spec]["ms_per_step"] / full for st in strategies}


def run(config, workdir: str, args: Args = Args()) -> dict:
  """Measures the table at every requested checkpoint of the run in `workdir`; returns what
  grad_error.json holds."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  ge = config.grad_error
  config_checks.validate_config(config)   # the config first, then which checkpoints, then the data
  try:
    step_plan.check_prior_measured(config, "grad_error.candidates")
  except UserError as e:   # these tables may be for a look only; --mode=search would refuse them
    logging.warning("%s (before --mode=search can weigh these tables against it)", e)
  available = saved_steps(workdir)
  steps = steps_to_analyse(config, workdir, available)
  setup = run_setup.build(config, splits=("train",))
  strategies = step_plan.candidates(config, "grad_error.candidates")
  grad_fns = grad_error.make_grad_fns(config, setup.model, strategies, setup.state_shardings,
                                      setup.mesh)
  costs = {st: step_plan.step_cost_units(config, st) for st in strategies}
  cost_ratios = measured_cost_ratios(config, workdir, strategies)
  # With a prior, a table keeps measuring (up to max_rounds) until a challenger below the prior
  # has the batches that could displace it.
  prior = step_plan.prior_stages(config, [st.spec for st in strategies])
  needed = (schedule_search.batches_to_displace(len(strategies) - 1, float(ge.ci_level))
            if prior else 0)

  t_start = time.time()
  tables = []
  for step in steps:
    t0 = time.time()
    state = restore(available[step], step, setup.restore_target)
    # The batches this run would have seen next: R for g*, then the same M for every strategy.
    # Each further round continues the same stream.
    batches = streams.global_batches(setup.train_source, config, setup.host_shard, setup.mesh,
                                     start_step=step)
    next_batches = lambda n: [next(batches) for _ in range(n)]  # noqa: E731
    progress = setup.plan.progress_at(step)
    rng = jax.random.fold_in(jax.random.key(config.seed), rng_streams.GRAD_ERROR + step)
    rows = grad_error.measure(config, state, next_batches, ge.reference_batches, ge.batches,
                              grad_fns, costs, rng, progress, max_rounds=int(ge.max_rounds),
                              seed=config.seed * 1_000_003 + step, cost_ratios=cost_ratios,
                              prior=schedule_search.prior_at(prior, progress),
                              min_batches=needed, mesh=setup.mesh)
    tables.append({"step": step, "progress": progress, "rows": rows,
                   "seconds": time.time() - t0})
    logging.info("grad_error at step %d (%.0f%% of the budget) in %.0fs", step, 100 * progress,
                 time.time() - t0)
    print(grad_error.format_table(tables[-1]), flush=True)

  result = {"workdir": workdir, "batch_size": int(config.batch_size),
            "reference_batches": int(ge.reference_batches), "batches": int(ge.batches),
            "max_rounds": int(ge.max_rounds), "ci_level": float(ge.ci_level),
            "bootstrap": int(ge.bootstrap), "metric": grad_error.metric_of(config),
            "tables": tables, "seconds": time.time() - t_start}
  if jax.process_index() == 0:
    path = os.path.join(workdir, "grad_error.json")
    io.atomic_write_json(path, result)
    report.grad_error_heatmap(tables, os.path.join(workdir, "grad_error.png"))
    save_config(config, workdir, "grad_error", primary=jax.process_index() == 0)
    print(f"wrote {path} and grad_error.png ({result['seconds']:.0f}s)", flush=True)
  return result
