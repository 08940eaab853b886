"""The trainer, top to bottom: setup, mesh, input, model, shardings, step, checkpoint, evals, loop."""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np
from absl import logging

from input_pipeline import fingerprint, pipeline, sources
from vit_accel import checkpointing, io, online, preemption, run_identity, schedule
from vit_accel import sharding as sharding_lib
from vit_accel.compression import BranchStrategies
from vit_accel.errors import Preempted, StorageError, UserError
from vit_accel.evaluator import Evaluator
from vit_accel.metric_writer import MetricWriter, read_metrics
from vit_accel.train_step import (build_model, compile_train_step, eval_params, is_online,
                                  make_optimizer, schedule_stages, state_layout, step_cost_units,
                                  validate_config)


# ----------------------------------------------------------------------------------------- setup
def budget_units(config, num_train_examples: int) -> float:
  """`budget` (base-forward units) when set, else `budget_epochs` full-cost epochs: that many passes
  over the train split with the uncompressed step."""
  if config.get("budget", -1) > 0:
    return float(config.budget)
  full = BranchStrategies.parse("full|full")
  return float(config.budget_epochs) * num_train_examples * step_cost_units(config, full)


def make_step_plan(config, num_train_examples: int, decisions=()) -> schedule.StepPlan:
  """The step plan; for an online schedule, from the decisions taken so far (the rest projected)."""
  budget = budget_units(config, num_train_examples)
  cost = lambda st: step_cost_units(config, st)  # noqa: E731
  if is_online(config):
    stages, overheads = schedule.online_stages(
        config.online.every, list(decisions), config.compression.bucket, config.model,
        online.overhead_units(config))
    return schedule.make_plan(stages, budget, config.batch_size, cost, config.model, overheads)
  return schedule.make_plan(schedule_stages(config), budget, config.batch_size, cost, config.model)


@dataclasses.dataclass(frozen=True)
class PlanMarks:
  """The steps a plan fixes for the loop: its end, where this invocation stops (stop_at_step), and
  where the extra evaluations (eval.at_progress) and milestone checkpoints fall. Derived again
  whenever the plan changes (an online schedule's decisions)."""
  total_steps: int
  stop_at: int
  eval_steps: frozenset
  milestone_steps: frozenset


def plan_marks(config, plan: schedule.StepPlan) -> PlanMarks:
  total = plan.total_steps
  at = lambda fractions: frozenset(plan.step_at_progress(f) for f in fractions)  # noqa: E731
  return PlanMarks(total_steps=total,
                   stop_at=total if config.stop_at_step <= 0 else min(total, config.stop_at_step),
                   eval_steps=at(config.eval.get("at_progress", ())),
                   milestone_steps=at(config.checkpoint.get("at_progress", ())))


# ---------------------------------------------------------------------------------------- driver
def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the final evaluation metrics."""
  validate_config(config)
  sources.check_source(config)
  if config.compile_cache_dir:
    # Re-runs and resumes reuse compiled steps instead of compiling them again.
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  mesh = sharding_lib.make_mesh(config)
  sharding_lib.check_batch(config.batch_size, mesh)
  logging.info("mesh %s on %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform, jax.process_count())

  # Input: the training split, this host's part of it, and the test split (evaluation), both read
  # before anything compiles. The plan: identical on every host.
  train_source = pipeline.load_source(config, "train")
  test_source = pipeline.load_source(config, "test")
  num_train = train_source.num_examples
  plan = make_step_plan(config, num_train)
  split = pipeline.HostSplit(jax.process_index(), jax.process_count(), config.batch_size)
  logging.info("%s", plan.describe())

  # Model and optimiser; shapes first, then shardings, then state created directly in them.
  model = build_model(config)
  tx = make_optimizer(config)
  init_rng = jax.random.key(config.seed)
  init_state, abstract_state, state_shardings = state_layout(config, model, tx, mesh)
  meta = run_identity.run_metadata(config, plan,
                                  fingerprint.fingerprint(config, train_source, test_source),
                                  online=is_online(config))

  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=config.checkpoint.keep,
                                    every_steps=config.checkpoint.every_steps,
                                    async_save=config.checkpoint.async_save)
  # Milestones: checkpoints at chosen budget fractions, all kept (the gradient-error analysis reads
  # them); beside the rolling checkpoints, never restored from.
  milestones = (checkpointing.Checkpointer(f"{workdir}/{checkpointing.MILESTONES}", keep=None,
                                           every_steps=1, async_save=config.checkpoint.async_save,
                                           resumed_from=ckpt)
                if config.checkpoint.get("at_progress", ()) else None)
  wall_offset = 0.0  # wall-clock seconds spent by earlier invocations of this run
  decisions = []     # online schedule: one per budget segment decided so far
  eval_offset = 0.0  # ... of which in evaluations

  def check_saved(saved_meta):
    run_identity.check_resumable(saved_meta, meta, ckpt.directory, config.allow_schedule_change)

  restored = ckpt.restore_latest_good(
      checkpointing.abstract_with_shardings(abstract_state, state_shardings), check_saved)
  ckpt.remove_unfinished()   # this run owns the directory now (its identity matched)
  if restored is None:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)
    start_step = 0
  else:
    state, saved_meta = restored
    start_step = int(state.step)
    wall_offset = float(saved_meta.get("wall_s", 0.0))
    eval_offset = float(saved_meta.get("eval_wall_s", 0.0))
    decisions = list(saved_meta.get("online_decisions", []))
    if decisions:
      plan = make_step_plan(config, num_train, decisions)
    finished = [m for m in read_metrics(workdir)
                if m["step"] >= plan.total_steps and "knn_top1" in m]
    if start_step >= plan.total_steps and finished:
      ckpt.close()
      if milestones is not None:
        milestones.close()
      print(f"run already complete at step {start_step}; final kNN top-1: "
            f"{finished[-1]['knn_top1']:.4f}", flush=True)
      return finished[-1]
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    io.atomic_write_text(os.path.join(workdir, "plan.json"), plan.to_json())

  n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params["backbone"]))
  logging.info("backbone: %.2fM params; %d steps of global batch %d", n_params / 1e6,
               plan.total_steps, config.batch_size)

  # One step per distinct stage signature, compiled ahead of time so shape errors show before data
  # flows and nothing compiles inside the loop.
  # Online: every candidate may be chosen, so all are compiled.
  compiled_steps = {}
  needed = [(s.index, s.strategies) for s in plan.stages if s.end_step > start_step]
  scheduler = None
  if is_online(config):
    needed = list(enumerate(online.candidate_strategies(config)))
    scheduler = online.OnlineScheduler(config, model, mesh, state_shardings, train_source, split)
  for index, strategies in needed:
    if strategies in compiled_steps:
      continue
    compiled_steps[strategies], seconds = compile_train_step(
        config, model, tx, strategies, mesh, abstract_state, state_shardings)
    logging.info("compiled step %d (%s) in %.1fs", index, strategies.spec, seconds)

  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  writer.drop_after(start_step)
  evaluator = Evaluator(config, model, mesh, state_shardings, train_source, test_source)
  marks = plan_marks(config, plan)
  eta = EtaEstimator(plan)

  t_start = time.time()
  train_time = 0.0
  eval_time = 0.0

  def elapsed():
    """Wall-clock seconds of this run's loop (training + evals), over all its invocations."""
    return wall_offset + time.time() - t_start

  def wall_fields():
    """wall_s, and train_wall_s = wall_s without evaluations (what time-to-accuracy counts)."""
    wall = elapsed()
    return {"wall_s": wall, "train_wall_s": wall - eval_offset - eval_time}

  def checkpoint_meta():
    return {**meta, "wall_s": elapsed(), "eval_wall_s": eval_offset + eval_time,
            "online_decisions": decisions}

  def evaluate(step, final):
    nonlocal eval_time
    # Steps are dispatched asynchronously: let the queued ones finish first, so their time counts as
    # training, not as evaluation.
    jax.block_until_ready(state)
    walls = wall_fields()
    t_eval = time.time()
    result = evaluator(eval_params(config, state), final=final)
    eval_time += time.time() - t_eval
    writer.write(step, {**result, **walls, "budget_units": plan.units_at(step),
                        "budget_progress": plan.progress_at(step)})
    logging.info("step %d: kNN top-1 %.4f, linear probe %.4f (bank %d, queries %d, %.1fs)", step,
                 result["knn_top1"], result["linear_top1"], result["knn_bank"],
                 result["knn_queries"], result["eval_s"])
    return result

  if start_step == 0 and config.eval.at_start:
    evaluate(0, final=True)

  dataset = pipeline.train_dataset(train_source, config, split, start_step)
  batches = dataset.as_numpy_iterator()
  t_log = time.time()
  steps_since_log = 0
  result = {}
  step = start_step
  replicated = sharding_lib.replicated(mesh)
  # SIGTERM / SIGINT: finish the step, checkpoint, raise Preempted (see preemption.py).
  with preemption.StopRequest(config.preemption_check_every_steps) as stop_request:
    try:
      while step < marks.stop_at:
        if scheduler is not None and len(decisions) < len(plan.stages) \
            and step == plan.stages[len(decisions)].start_step:
          decision = scheduler.decide(state, step, len(decisions), plan.progress_at(step))
          decisions.append(decision)
          plan = make_step_plan(config, num_train, decisions)
          marks = plan_marks(config, plan)
          eta.plan = plan
          writer.write(step, {"online_segment": decision["segment"],
                              "online_choice": decision["strategy"],
                              "online_overhead_units": decision["overhead_units"],
                              "online_measure_s": decision["seconds"],
                              **{f"ca_mse/{k}": v for k, v in decision["ca_mse"].items()}})
          if jax.process_index() == 0:
            io.atomic_write_text(os.path.join(workdir, "plan.json"), plan.to_json())
          if step >= marks.stop_at:
            break
        stage = plan.stage_at(step)
        batch = sharding_lib.host_to_global(next(batches), mesh)
        progress = jax.device_put(np.float32(plan.progress_at(step)), replicated)
        state, metrics = compiled_steps[stage.strategies](state, batch, progress)
        step += 1
        steps_since_log += 1
        # Log at the cadence, at the end, and at stage ends (so per-stage step times are measured).
        log_now = (step % config.log_every_steps == 0 or step == marks.stop_at
                   or step == stage.end_step)
        stop_now = stop_request.should_stop(step)
        save_now = step % config.checkpoint.every_steps == 0 or stop_now
        milestone_now = milestones is not None and step in marks.milestone_steps
        if log_now or save_now or milestone_now:
          metrics = jax.device_get(metrics)  # the loop's only sync points
          for name in ("loss", "grad_norm"):  # checked before a save: no bad checkpoint
            if not math.isfinite(float(metrics[name])):
              ckpt.wait()
              last = ckpt.last_complete_step()
              kept = (f"the last good checkpoint (step {last}) is kept" if last is not None
                      else "nothing was saved (no checkpoint before it)")
              raise UserError(f"non-finite {name} {float(metrics[name])} at step {step} (stage "
                              f"{stage.index}, {stage.spec}); {kept}; lower optim.base_lr or "
                              f"enable optim.grad_clip")
        if save_now:
          ckpt.save(step, state, checkpoint_meta(), force=True)
        # A resumed run reaches a milestone again when it was killed after saving it.
        if milestone_now and step not in milestones.all_steps():
          milestones.save(step, state, checkpoint_meta(), force=True)
        if stop_now:
          ckpt.wait()
          raise Preempted(step, stop_request.signal_name, ckpt.directory)
        if log_now:
          dt = time.time() - t_log
          train_time += dt
          eta.record(stage, dt, steps_since_log)
          # The step's scalars: loss, lr, momentum, grad_norm and the objective's own (DINO's
          # teacher temperature and entropy).
          line = {**{name: float(value) for name, value in metrics.items()},
                  "stage": stage.index, "seq_len": stage.seq_len,
                  "key_seq_len": stage.key_seq_len,
                  "budget_units": plan.units_at(step), "budget_progress": plan.progress_at(step),
                  **wall_fields(),
                  "images_per_s": config.batch_size * steps_since_log / dt}
          writer.write(step, line)
          logging.info("step %d/%d budget %.1f%% stage %d (%s, seq %d) loss %.4f lr %.2e "
                       "%.0f img/s ETA %s", step, marks.total_steps, 100.0 * line["budget_progress"],
                       stage.index, stage.spec, stage.seq_len, line["loss"], line["lr"],
                       line["images_per_s"], _format_duration(eta.remaining(step, marks.stop_at)))
          t_log, steps_since_log = time.time(), 0
        # Periodic kNN, except within half an interval of the final one; and at budget fractions.
        periodic = (config.eval.every_steps > 0 and step % config.eval.every_steps == 0
                    and marks.total_steps - step > config.eval.every_steps // 2)
        if (periodic or step in marks.eval_steps) and step < marks.total_steps:
          jax.block_until_ready(state)  # queued steps are training time
          t_eval = time.time()
          result = evaluate(step, final=False)
          t_log += time.time() - t_eval  # step-time measurements exclude evaluation

      if step == marks.stop_at and step not in ckpt.all_steps():
        ckpt.save(step, state, checkpoint_meta(), force=True)
      ckpt.wait()
      if step >= marks.total_steps:
        result = evaluate(step, final=True)
        init = [m for m in read_metrics(workdir) if m["step"] == 0 and "knn_top1" in m]
        logging.info("train %s, eval %s (%.1f%% of the run)", _format_duration(train_time),
                     _format_duration(eval_time),
                     100 * eval_time / max(train_time + eval_time, 1e-9))
        summary = f"final kNN top-1: {result['knn_top1']:.4f}"
        if init:
          summary += f" (at initialisation {init[0]['knn_top1']:.4f})"
        summary += f", linear probe top-1: {result['linear_top1']:.4f}"
        if init and "linear_top1" in init[0]:
          summary += f" (at initialisation {init[0]['linear_top1']:.4f})"
        print(summary, flush=True)
    except BaseException as e:
      # A stop request, a NaN, a failed write or any crash: let a pending async save finish (a
      # whole checkpoint) and close the rest without letting a second failure hide the first.
      _close_quietly(writer, ckpt, milestones)
      if isinstance(e, OSError) and checkpointing.is_storage_failure(e):   # metrics, plan.json
        raise StorageError(f"writing to {workdir} failed ({checkpointing.storage_cause(e)}"
                           f"{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}); "
                           f"{ckpt.last_complete_text()}; free space or fix the file system, "
                           f"then re-run the same command to resume") from None
      raise
  writer.close()
  ckpt.close()   # a pending save that fails now is a StorageError like any other
  if milestones is not None:
    milestones.close()
  return result


def _close_quietly(*closables) -> None:
  """close() each (None skipped), ignoring what they raise: only ever called while another
  exception, the one to report, is on its way out."""
  for c in closables:
    if c is None:
      continue
    try:
      c.close()
    except Exception:  # noqa: BLE001 - the propagating exception is the one to report
      logging.warning("while stopping: closing %s failed", type(c).__name__, exc_info=False)


class EtaEstimator:
  """Time left from measured per-stage step times; a stage not yet run is estimated from a measured
  one scaled by the cost model (a step's time ~ its units)."""

  def __init__(self, plan: schedule.StepPlan):
    self.plan = plan
    self.seconds_per_step = {}

  def record(self, stage, seconds: float, steps: int):
    if steps > 0:
      self.seconds_per_step[stage.index] = seconds / steps

  def remaining(self, step: int, stop_at: int) -> float:
    if not self.seconds_per_step:
      return 0.0
    ref = self.plan.stages[max(self.seconds_per_step)]
    sec_per_unit = self.seconds_per_step[ref.index] / ref.units_per_step
    total = 0.0
    for s in self.plan.stages:
      left = max(0, min(s.end_step, stop_at) - max(s.start_step, step))
      per_step = self.seconds_per_step.get(s.index, sec_per_unit * s.units_per_step)
      total += left * per_step
    return total
