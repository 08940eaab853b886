"""Where a run's time goes: wall-clock, training and evaluation seconds over all its invocations, the
step-time laps behind images/s, and the time left.

The totals are saved in every checkpoint's metadata (`wall_s`, `eval_wall_s`, `input_wait_s`), so a
resumed run continues its clock: `train_wall_s` (wall-clock without evaluations) is what
time-to-accuracy counts, and `input_wait_s` the part of it the accelerator sat idle waiting for the
input pipeline's next batch (a data-bound run's lost time; steps are dispatched asynchronously, so
a wait while earlier steps still run is hidden behind them and not counted: see add_input_wait).
"""
from __future__ import annotations

import contextlib
import time


class Chronometer:
  """The run's clock. `saved`: a checkpoint's metadata (its wall_s / eval_wall_s / input_wait_s), {}
  for a new run."""

  def __init__(self, saved: dict | None = None):
    saved = saved or {}
    self.wall_before = float(saved.get("wall_s", 0.0))      # earlier invocations, evals included
    self.eval_before = float(saved.get("eval_wall_s", 0.0))
    self.input_before = float(saved.get("input_wait_s", 0.0))
    self.train_s = 0.0   # this invocation: seconds of logged step intervals
    self.eval_s = 0.0    # this invocation: seconds inside evaluations
    self.input_s = 0.0   # this invocation: seconds idle waiting for the next batch
    self.start()

  def start(self) -> None:
    """Starts (or restarts) this invocation's clock and the first lap."""
    self._t0 = self._lap_t0 = time.time()
    self._lap_steps = 0
    self._lap_input_s = 0.0

  def wall(self) -> float:
    """Wall-clock seconds of the run's loop (training + evaluations) over all its invocations."""
    return self.wall_before + time.time() - self._t0

  def fields(self) -> dict:
    """wall_s, train_wall_s = wall_s without evaluations (what time-to-accuracy counts), and
    input_wait_s = the part of train_wall_s spent waiting for input batches (seconds, all
    invocations)."""
    wall = self.wall()
    return {"wall_s": wall, "train_wall_s": wall - self.eval_before - self.eval_s,
            "input_wait_s": self.input_before + self.input_s}

  def meta(self) -> dict:
    """The totals a checkpoint saves (and Chronometer(saved) reads back)."""
    return {"wall_s": self.wall(), "eval_wall_s": self.eval_before + self.eval_s,
            "input_wait_s": self.input_before + self.input_s}

  def step_done(self) -> None:
    self._lap_steps += 1

  def lap(self) -> tuple[float, int]:
    """(seconds, steps) of the current lap, counted as training time; restart_lap() begins the
    next one (after the log line, so writing it counts in neither)."""
    seconds = time.time() - self._lap_t0
    self.train_s += seconds
    return seconds, self._lap_steps

  def lap_input_wait(self) -> float:
    """Seconds of the current lap spent waiting for input batches (part of lap()'s seconds)."""
    return self._lap_input_s

  def restart_lap(self) -> None:
    self._lap_t0, self._lap_steps, self._lap_input_s = time.time(), 0, 0.0

  def add_input_wait(self, seconds: float) -> None:
    """Counts `seconds` (>= 0) of waiting for an input batch with nothing left running on the
    accelerator (the caller decides that): step time that is also input wait."""
    self.input_s += seconds
    self._lap_input_s += seconds

  @contextlib.contextmanager
  def evaluating(self):
    """Times an evaluation: its seconds count as evaluation time."""
    t0 = time.time()
    try:
      yield
    finally:
      self.eval_s += time.time() - t0

  @contextlib.contextmanager
  def lap_paused(self):
    """What runs inside (an evaluation, its metrics line) is not the current lap's step time."""
    t0 = time.time()
    try:
      yield
    finally:
      self._lap_t0 += time.time() - t0


class EtaEstimator:
  """Time left from measured per-stage step times; a stage not yet run is estimated from a measured
  one scaled by the cost model (a step's time ~ its units)."""

  def __init__(self, plan):
    self.plan = plan   # step_plan.StepPlan; replaced when an online schedule decides
    self.seconds_per_step = {}

  def record(self, stage, seconds: float, steps: int) -> None:
    if steps > 0:
      self.seconds_per_step[stage.index] = seconds / steps

  def remaining(self, step: int, stop_at: int) -> float:
    """Seconds from `step` to `stop_at` (0 before any stage was measured)."""
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


def format_duration(seconds: float) -> str:
  """'1h02m03s' / '2m03s'."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """Whether a periodic action `every` steps is due after `step` steps (never when every <= 0), or,
  with `total`, at the last step (big_vision's cadence helper)."""
  return (every > 0 and step % every == 0) or (total is not None and step == total)
