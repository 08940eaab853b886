"""The trainer: restore or initialise, then the loop - decide, step, guard, checkpoint, log, evaluate.

The run itself (mesh, sources, plan, model, state layout) is built by run_setup; this module only
runs it. Imported by the mode drivers (train, pilot) and nothing else.
"""
from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from input_pipeline import fingerprint, streams
from vit_accel import (
  checkpointing,
  errors,
  io,
  modes,
  online,
  preemption,
  run_identity,
  run_setup,
  state,
  step_plan,
)
from vit_accel import sharding as sharding_lib
from vit_accel.chronometer import Chronometer, EtaEstimator, format_duration, itstime
from vit_accel.errors import Preempted, StorageError, UserError
from vit_accel.evaluator import Evaluator
from vit_accel.metric_writer import MetricWriter, read_metrics
from vit_accel.train_step import compile_train_step


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`; returns the final evaluation metrics ({} when this
  invocation stops before the end, stop_at_step). Raises UserError (bad input, a NaN), Preempted
  (SIGTERM/SIGINT, after a checkpoint), StorageError (a failed write in the loop) or OSError (a
  failed write of config.json / plan.json / metrics.jsonl before it)."""
  run = run_setup.build(config)
  use_compilation_cache(config)
  plan = run.plan
  logging.info("%s", plan.describe())
  meta = run_identity.run_metadata(
      config, plan, fingerprint.fingerprint(config, run.train_source, run.test_source),
      online=step_plan.is_online(config))
  # A fresh run's starting weights (init.workdir) are read before its workdir is created, so a bad
  # source leaves nothing behind; a resuming run never reads them.
  warm = None if has_checkpoints(workdir) else read_warm_start(config, run.restore_target, workdir)
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=config.checkpoint.keep,
                                    every_steps=config.checkpoint.every_steps,
                                    async_save=config.checkpoint.async_save)
  closer = _Closer(workdir, ckpt)
  # Milestones: checkpoints at chosen budget fractions, all kept (the gradient-error analysis reads
  # them); beside the rolling checkpoints, never restored from.
  milestones = closer.add(checkpointing.Checkpointer(
      f"{workdir}/{checkpointing.MILESTONES}", keep=None, every_steps=1,
      async_save=config.checkpoint.async_save, resumed_from=ckpt)
      if config.checkpoint.at_progress else None)

  # ------------------------------------------------------------------------- restore or start
  restored = ckpt.restore_latest_good(run.restore_target, lambda saved: run_identity.check_resumable(
      saved, meta, ckpt.directory, config.allow_schedule_change))
  ckpt.remove_unfinished()   # this run owns the directory now (its identity matched)
  saved = restored[1] if restored else {}
  train_state = restored[0] if restored else initial_state(run, warm, workdir)
  start_step = int(train_state.step)
  decisions = list(saved.get("online_decisions", []))   # online: one per segment decided so far
  if decisions:
    plan = step_plan.make_step_plan(config, run.train_source.num_examples, decisions)
  if restored:
    finished = [m for m in read_metrics(workdir, kind="eval") if m["step"] >= plan.total_steps]
    if start_step >= plan.total_steps and finished:
      closer.close()
      print(f"run already complete at step {start_step}; final kNN top-1: "
            f"{finished[-1]['knn_top1']:.4f}", flush=True)
      return finished[-1]
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  # The run's own record of its config, and its step plan: written once its identity is checked.
  modes.save_config(config, workdir, "train", primary=jax.process_index() == 0)
  _write_plan(workdir, plan)
  logging.info("backbone: %.2fM params; %d steps of global batch %d",
               sum(x.size for x in jax.tree.leaves(run.abstract_state.params["backbone"])) / 1e6,
               plan.total_steps, config.batch_size)

  scheduler = online.OnlineScheduler(run) if step_plan.is_online(config) else None
  compiled_steps = _compile_steps(run, plan, start_step, online=scheduler is not None)
  writer = closer.add(MetricWriter(workdir, primary=jax.process_index() == 0,
                                   tensorboard=config.tensorboard), first=True)
  writer.drop_after(start_step)
  evaluator = Evaluator(config, run.model, run.mesh, run.state_shardings, run.train_source,
                        run.test_source)
  marks = step_plan.plan_marks(config, plan)
  eta = EtaEstimator(plan)
  replicated = sharding_lib.replicated(run.mesh)
  clock = Chronometer(saved)
  # Late-binding closures: they see the loop's current state and plan.
  evaluate = lambda step, final: _evaluate(  # noqa: E731
      evaluator, writer, clock, config, state.eval_params(config, train_state), plan, step, final)
  saved_meta = lambda: {**meta, **clock.meta(), "online_decisions": decisions}  # noqa: E731
  if start_step == 0 and config.eval.at_start:
    evaluate(0, final=True)
  batches = streams.global_batches(
      run.train_source, config, run.host_shard, run.mesh, start_step,
      local_crops_by_step=step_plan.local_crops_by_step(config, plan))
  clock.restart_lap()
  result, step, running = {}, start_step, None
  # SIGTERM / SIGINT: finish the step, checkpoint, raise Preempted (see preemption.py).
  with preemption.StopRequest(config.preemption_check_every_steps) as stop_request, closer:
    while step < marks.stop_at:
      # Decide: an online schedule measures at the first step of each segment.
      if scheduler is not None and scheduler.due(step, plan, decisions):
        decisions.append(scheduler.decide(train_state, step, decisions,
                                          plan.progress_at(step)))
        plan = step_plan.make_step_plan(config, run.train_source.num_examples, decisions)
        marks, eta.plan = step_plan.plan_marks(config, plan), plan
        writer.write(step, online.metrics_line(decisions[-1]), kind="online")
        _write_plan(workdir, plan)
        if step >= marks.stop_at:
          break
      # Step.
      stage = plan.stage_at(step)
      progress = jax.device_put(np.float32(plan.progress_at(step)), replicated)
      waiting = time.perf_counter()
      batch = next(batches)
      waited = time.perf_counter() - waiting
      # Lost time only if the accelerator had run out of work meanwhile: with earlier steps still
      # running (asynchronous dispatch) the wait is hidden behind them.
      if running is None or all(m.is_ready() for m in jax.tree.leaves(running)):
        clock.add_input_wait(waited)
      train_state, metrics = compiled_steps[stage.strategies](train_state, batch, progress)
      running = metrics    # the dispatched step's outputs (still on the device)
      step += 1
      clock.step_done()
      # Log at the cadence, at the end, and at stage ends (so per-stage step times are measured).
      log_now = itstime(step, config.log_every_steps, marks.stop_at) or step == stage.end_step
      stop_now = stop_request.should_stop(step)
      save_now = itstime(step, config.checkpoint.every_steps) or stop_now
      milestone_now = milestones is not None and step in marks.milestone_steps
      # Guard: the loop's only sync point; checked before a save, so no bad checkpoint.
      if log_now or save_now or milestone_now:
        metrics = jax.device_get(metrics)
        _check_finite(metrics, step, stage, ckpt)
      # Checkpoint (a resumed run reaches a milestone again when it was killed after saving it).
      if save_now:
        ckpt.save(step, train_state, saved_meta(), force=True)
      if milestone_now and step not in milestones.all_steps():
        milestones.save(step, train_state, saved_meta(), force=True)
      if stop_now:
        ckpt.wait()
        raise Preempted(step, stop_request.signal_name, ckpt.directory)
      if log_now:
        _log_step(writer, eta, clock, config, plan, marks, stage, step, metrics)
      # Evaluate: periodic kNN, except within half an interval of the final one; and at budget
      # fractions.
      periodic = (itstime(step, config.eval.every_steps)
                  and marks.total_steps - step > config.eval.every_steps // 2)
      if (periodic or step in marks.eval_steps) and step < marks.total_steps:
        result = evaluate(step, final=False)

    if step == marks.stop_at and step not in ckpt.all_steps():
      ckpt.save(step, train_state, saved_meta(), force=True)
    ckpt.wait()
    if step >= marks.total_steps:
      result = evaluate(step, final=True)
      _print_summary(workdir, clock, result)
  closer.close()
  return result


# ------------------------------------------------------------------------------ the loop's parts
# A warm start's part of the train state: the weights and the objective's state, not the step or
# the optimiser's moments (a fresh optimiser may even have another structure, e.g. clipping).
WARM_START_FIELDS = ("params", "ema_params", "extra")


def read_warm_start(config, target, workdir: str | None = None) -> dict | None:
  """{field: subtree} (WARM_START_FIELDS, on `target`'s shardings) of checkpoint
  init.checkpoint_step (-1 = the latest) of the run in init.workdir; None when init.workdir is "".
  Only those fields are compared with `target` and read (checkpointing.restore_checkpoint).

  Raises UserError (one line, naming init.workdir) when it is this run's own `workdir`, holds no
  checkpoints/, not that step, a run of another objective or train-state format, another network
  or objective state, or one that cannot be read."""
  source = config.init.workdir
  if not source:
    return None
  path = os.path.abspath(os.path.expanduser(source))
  fix = (f"point init.workdir={source!r} at a trained run of this model and objective (e.g. a "
         f"pilot's WORKDIR/pilot), or clear it")
  if workdir is not None and path == os.path.abspath(workdir):
    raise UserError(f"init.workdir={source!r} is this run's own --workdir; a run resumes its own "
                    f"checkpoints without it: clear it, or use a new --workdir")
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise UserError(f"init.workdir={source!r} holds no checkpoints/ directory: {fix}")

  def check_meta(meta: dict) -> None:
    # Another layout of the train state, or another objective: equal shapes do not make equal
    # meanings (e.g. one objective's projection head read as another's).
    if meta.get("state_format", 1) != run_identity.STATE_FORMAT:
      raise UserError(f"init.workdir={source!r} holds a checkpoint in train-state format "
                      f"{meta.get('state_format', 1)} (an older vit-accel); {fix}")
    objective = (meta.get("run") or {}).get("objective", meta.get("objective"))
    if objective is not None and objective != config.objective:
      raise UserError(f"init.workdir={source!r} holds a {objective} run, this run is "
                      f"{config.objective}; {fix}")

  step, fields, _ = checkpointing.restore_checkpoint(config, path, target,
                                                     step_key="init.checkpoint_step",
                                                     fields=WARM_START_FIELDS, fix=fix,
                                                     check_meta=check_meta)
  logging.info("initialised from %s/checkpoints step %d (weights only)", path, step)
  return fields


def initial_state(run, warm: dict | None = None, workdir: str | None = None) -> state.TrainState:
  """A fresh run's TrainState: random (run.fresh_state()), or with init.workdir set the trained
  network, EMA copy and objective state (`extra`) of that run's checkpoint (read_warm_start, or
  `warm` when already read), with step 0 and a fresh optimiser state, so the learning rate, the
  momentum and every other schedule (DINO's teacher temperature and last-layer freeze too) start
  afresh: a warm start, as big_vision's `model_init` loads a pretrained model, or a pilot's
  weights handed on. The source's optimiser state is not read, so it may differ in structure.

  Raises UserError as read_warm_start does."""
  fresh = run.fresh_state()
  warm = warm if warm is not None else read_warm_start(run.config, run.restore_target, workdir)
  if warm is None:
    return fresh
  # The optimiser's state is a function of the tree's shapes only at step 0 (zero moments): the
  # fresh one fits the restored weights.
  return fresh.replace(**warm)


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a finished step (Orbax renames a finished save to its bare
  step number), read without creating anything."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def use_compilation_cache(config) -> None:
  """Re-runs and resumes reuse compiled steps instead of compiling them again (compile_cache_dir;
  "" leaves JAX's own setting, off unless JAX_COMPILATION_CACHE_DIR names a directory)."""
  if not config.compile_cache_dir:
    return
  path = os.path.expanduser(config.compile_cache_dir)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX opens its cache at most once per process (at the first compilation with a directory
    # set): a process that compiled before this run (a notebook, a test session) must reopen it.
    compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _write_plan(workdir: str, plan: step_plan.StepPlan) -> None:
  """WORKDIR/plan.json (atomic; process 0): the step plan this run follows now."""
  if jax.process_index() == 0:
    io.atomic_write_text(os.path.join(workdir, "plan.json"), plan.to_json())


def _compile_steps(run, plan, start_step: int, *, online: bool) -> dict:
  """strategies -> compiled step, for every stage still to run (online: every candidate, since any
  may be chosen), compiled ahead of time so shape errors show before data flows and nothing
  compiles inside the loop."""
  if online:
    needed = list(enumerate(step_plan.candidates(run.config, "online.candidates")))
  else:
    needed = [(s.index, s.strategies) for s in plan.stages if s.end_step > start_step]
  compiled = {}
  for index, strategies in needed:
    if strategies not in compiled:
      compiled[strategies], seconds = compile_train_step(
          run.config, run.model, run.tx, strategies, run.mesh, run.abstract_state,
          run.state_shardings)
      logging.info("compiled step %d (%s) in %.1fs", index, strategies.spec, seconds)
  return compiled


def _check_finite(metrics: dict, step: int, stage, ckpt) -> None:
  """UserError for a non-finite loss or gradient norm, naming the last good checkpoint."""
  for name in ("loss", "grad_norm"):
    if not math.isfinite(float(metrics[name])):
      ckpt.wait()
      last = ckpt.last_complete_step()
      kept = (f"the last good checkpoint (step {last}) is kept" if last is not None
              else "nothing was saved (no checkpoint before it)")
      raise UserError(f"non-finite {name} {float(metrics[name])} at step {step} (stage "
                      f"{stage.index}, {stage.spec}); {kept}; lower optim.base_lr or "
                      f"enable optim.grad_clip")


def _log_step(writer, eta, clock, config, plan, marks, stage, step: int, metrics: dict) -> None:
  """The `train` metrics line and the log line: the step's scalars (loss, lr, momentum, grad_norm
  and the objective's own, e.g. DINO's teacher temperature), stage, budget, wall-clock, images/s."""
  seconds, steps = clock.lap()
  eta.record(stage, seconds, steps)
  line = {**{name: float(value) for name, value in metrics.items()},
          "stage": stage.index, "seq_len": stage.seq_len, "key_seq_len": stage.key_seq_len,
          "budget_units": plan.units_at(step), "budget_progress": plan.progress_at(step),
          **clock.fields(), "images_per_s": config.batch_size * steps / seconds,
          "input_wait_fraction": clock.lap_input_wait() / max(seconds, 1e-9)}
  writer.write(step, line, kind="train")
  logging.info("step %d/%d budget %.1f%% stage %d (%s, seq %d) loss %.4f lr %.2e %.0f img/s "
               "(input wait %.0f%%) ETA %s",
               step, marks.total_steps, 100.0 * line["budget_progress"], stage.index, stage.spec,
               stage.seq_len, line["loss"], line["lr"], line["images_per_s"],
               100.0 * line["input_wait_fraction"],
               format_duration(eta.remaining(step, marks.stop_at)))
  clock.restart_lap()


def _evaluate(evaluator, writer, clock, config, params, plan, step: int, final: bool) -> dict:
  """kNN + linear probe of `params` at `step`, written as an `eval` metrics line."""
  # Steps are dispatched asynchronously: let the queued ones finish first, so their time counts as
  # training, not as evaluation.
  jax.block_until_ready(params)
  with clock.lap_paused():
    walls = clock.fields()
    with clock.evaluating():
      result = evaluator(params, final=final)
    writer.write(step, {**result, **walls, "budget_units": plan.units_at(step),
                        "budget_progress": plan.progress_at(step)}, kind="eval")
    logging.info("step %d: kNN top-1 %.4f, linear probe %.4f (bank %d, queries %d, %.1fs)", step,
                 result["knn_top1"], result["linear_top1"], result["knn_bank"],
                 result["knn_queries"], result["eval_s"])
  return result


def _print_summary(workdir: str, clock: Chronometer, result: dict) -> None:
  """The final line: kNN and linear probe, beside the initial network's when it was evaluated."""
  logging.info("train %s (%.1f%% of it waiting for input), eval %s (%.1f%% of the run)",
               format_duration(clock.train_s), 100 * clock.input_s / max(clock.train_s, 1e-9),
               format_duration(clock.eval_s),
               100 * clock.eval_s / max(clock.train_s + clock.eval_s, 1e-9))
  init = [m for m in read_metrics(workdir, kind="eval") if m["step"] == 0]
  summary = f"final kNN top-1: {result['knn_top1']:.4f}"
  if init:
    summary += f" (at initialisation {init[0]['knn_top1']:.4f})"
  summary += f", linear probe top-1: {result['linear_top1']:.4f}"
  if init and "linear_top1" in init[0]:
    summary += f" (at initialisation {init[0]['linear_top1']:.4f})"
  print(summary, flush=True)


class _Closer:
  """Closes the run's metrics writer and checkpointers, once, in that order: close() on success (a
  pending save that fails then is a StorageError like any other); as a context manager, on any
  exception - a stop request, a NaN, a failed write, a crash - quietly, letting a pending async save
  finish, so a second failure cannot hide the first; a file-system failure of our own writes
  becomes one StorageError line."""

  def __init__(self, workdir: str, ckpt):
    self.workdir = workdir
    self.ckpt = ckpt
    self.closables = [ckpt]
    self.closed = False

  def add(self, closable, *, first: bool = False):
    if closable is not None:
      self.closables.insert(0 if first else len(self.closables), closable)
    return closable

  def close(self) -> None:
    if not self.closed:
      self.closed = True
      for c in self.closables:
        c.close()

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback) -> bool:
    if error is None:
      return False
    self.closed = True
    for c in self.closables:
      try:
        c.close()
      except Exception:  # noqa: BLE001 - the propagating exception is the one to report
        logging.warning("while stopping: closing %s failed", type(c).__name__, exc_info=False)
    if isinstance(error, OSError) and errors.is_storage_failure(error):  # metrics, plan
      raise StorageError(f"writing to {self.workdir} failed ({errors.storage_cause(error)}"
                         f"{': ' + str(error.filename) if getattr(error, 'filename', None) else ''}"
                         f"); {self.ckpt.last_complete_text()}; free space or fix the file system, then "
                         f"re-run the same command to resume") from None
    return False
