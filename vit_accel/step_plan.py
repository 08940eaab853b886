"""The step plan, from the config: budget -> stages -> StepPlan (and the loop's marks on it).

The one home of everything that decides how many steps of which compression a run takes: schedule
presets and parsing, the per-step cost of a strategy pair (analytic cost model), the budget, the
online schedule's projection and the cost of its measurements. Pure Python (no JAX arrays), so
every host and every mode derives the same plan.

Progress is measured in compute, not steps: the budget is in base-forward units (1 = one forward pass
of the uncompressed backbone on one sample, see compression.py), each stage of the schedule ends at a
fraction of it, and a compressed stage - cheaper per step - takes more steps for the same share.
Learning rate and EMA momentum are functions of progress = units spent / budget (optimizer.py,
objectives/ema.py).

A schedule is a preset name or a stage list "END:SPEC; END:SPEC; ...", END the budget fraction where the
stage ends (increasing, the last one 1) and SPEC the branch strategies ('QUERY', 'QUERY|KEY', or
with local crops 'QUERY|KEY|LOCAL'; compression.BranchStrategies).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable

from vit_accel import compression, objectives, schedule_search
from vit_accel.compression import BranchStrategies
from vit_accel.errors import UserError


def presets(base_patch: int) -> dict[str, str]:
  """Named schedules; patch sizes are relative to the model's base patch."""
  p2 = 2 * base_patch
  return {
      # The uncompressed baseline.
      "none": "1:full|full",
      # The paper's constant strategies: token dropout on the query only (75% dropped), and patch x2
      # on both views.
      "token_drop": "1:keep0.25",
      "patch_scale": f"1:patch{p2}|patch{p2}",
      # Accelerated default: coarse and cheap early, when gradients are far from converged and a
      # compressed estimate is nearly as good per unit of compute; full length at the end, which is
      # also what evaluation sees. Both branches are compressed early (a full-length key branch
      # would cap the saving at ~2x). On Fashion-MNIST (patch 4, 0.85 full-cost epochs) patch x2
      # for the first stage beat 25% token keep at equal budget: kNN 0.751 vs 0.703.
      "dynamic": f"0.55:patch{p2}|patch{p2}; 0.8:keep0.5|keep0.5; 1:full|full",
  }


@dataclasses.dataclass(frozen=True)
class Stage:
  end: float                       # budget fraction at which the stage ends
  strategies: BranchStrategies


def parse_schedule(spec: str, bucket: int, model_cfg, key: str = "schedule") -> list[Stage]:
  """Preset name or "END:SPEC; ..." -> stages, checked against the model (errors name the config
  key `key`)."""
  text = presets(model_cfg.patch_size).get(str(spec).strip(), str(spec))
  stages = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    end, sep, strategy = part.partition(":")
    try:
      end = float(end)
    except ValueError:
      sep = ""
    if not sep:
      raise UserError(f"{key}={spec!r}: cannot read stage {part!r}; use a preset "
                      f"({', '.join(presets(model_cfg.patch_size))}) or 'END:SPEC; END:SPEC', "
                      f"e.g. '0.5:keep0.25|keep0.25; 1:full'")
    stages.append(Stage(end, compression.parse_checked(strategy, bucket, model_cfg, key)))
  ends = [s.end for s in stages]
  if not stages or any(b <= a for a, b in zip([0.0] + ends, ends)) or abs(ends[-1] - 1) > 1e-9:
    raise UserError(f"{key}={spec!r}: stage ends must increase within (0, 1] and the last "
                    f"must be 1, got {ends}")
  return stages


@dataclasses.dataclass(frozen=True)
class PlannedStage:
  index: int
  spec: str
  strategies: BranchStrategies
  start_step: int
  num_steps: int
  start_units: float        # budget units spent before the stage
  units_per_step: float     # global batch x per-sample step cost
  seq_len: int              # gradient-branch tokens per view (CLS included)
  key_seq_len: int
  end_fraction: float

  @property
  def end_step(self) -> int:
    return self.start_step + self.num_steps


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The whole run, step by step; identical on every host (a pure function of config + data size)."""
  stages: tuple[PlannedStage, ...]
  budget: float
  batch_size: int

  @property
  def total_steps(self) -> int:
    return self.stages[-1].end_step

  def stage_at(self, step: int) -> PlannedStage:
    """The stage that runs step `step` (0-based: the step taking the state from step to step+1)."""
    for stage in self.stages:
      if step < stage.end_step:
        return stage
    return self.stages[-1]

  def units_at(self, step: int) -> float:
    """Budget units spent by the first `step` steps."""
    stage = self.stage_at(max(step - 1, 0))
    done = min(max(step - stage.start_step, 0), stage.num_steps)
    return stage.start_units + done * stage.units_per_step

  def progress_at(self, step: int) -> float:
    return self.units_at(step) / self.budget

  def step_at_progress(self, fraction: float) -> int:
    """The first step at which at least `fraction` of the budget is spent (total_steps if never)."""
    lo, hi = 0, self.total_steps
    while lo < hi:  # progress_at is non-decreasing in step
      mid = (lo + hi) // 2
      if self.progress_at(mid) >= fraction - 1e-12:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def to_dict(self) -> dict:
    return {"budget": self.budget, "batch_size": self.batch_size,
            "total_steps": self.total_steps,
            "stages": [{k: v for k, v in dataclasses.asdict(s).items() if k != "strategies"}
                       for s in self.stages]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  def describe(self) -> str:
    lines = [f"step plan: budget {self.budget:.4g} units, batch {self.batch_size}, "
             f"{self.total_steps} steps"]
    for s in self.stages:
      lines.append(f"  stage {s.index}: {s.spec:<28} seq {s.seq_len:>4}|{s.key_seq_len:<4} "
                   f"{s.num_steps:>7} steps x {s.units_per_step:.4g} units, to "
                   f"{100 * s.end_fraction:.0f}% of the budget")
    return "\n".join(lines)


def make_plan(stages: list[Stage], budget: float, batch_size: int, cost_per_sample,
              model_cfg, overheads=None) -> StepPlan:
  """Stage i runs floor(share_i x budget / (cost_i x batch)) steps; `cost_per_sample(strategies)`
  is the step cost per sample in base-forward units. `overheads[i]` (online schedules) is charged
  to the budget just before stage i: the stage starts that many units later and gets fewer steps."""
  planned = []
  step, units, prev_end = 0, 0.0, 0.0
  for i, st in enumerate(stages):
    per_step = cost_per_sample(st.strategies) * batch_size
    overhead = float(overheads[i]) if overheads else 0.0
    units += overhead
    n = math.floor(((st.end - prev_end) * budget - overhead) / per_step + 1e-9)
    if n < 1:
      raise UserError(f"budget={budget:.4g} units is too small for the plan: stage {i} "
                      f"({st.strategies.spec}, {100 * (st.end - prev_end):.0f}% of the budget) "
                      f"would get no step of {per_step:.4g} units; raise budget or budget_epochs")
    q, k = st.strategies.layouts(model_cfg.image_size, model_cfg.patch_size)
    planned.append(PlannedStage(index=i, spec=st.strategies.spec, strategies=st.strategies,
                                start_step=step, num_steps=n, start_units=units,
                                units_per_step=per_step, seq_len=q.seq_len,
                                key_seq_len=k.seq_len, end_fraction=st.end))
    step += n
    units += n * per_step
    prev_end = st.end
  return StepPlan(tuple(planned), float(budget), int(batch_size))


# -------------------------------------------------------------------------- online schedules
ONLINE = "online"


def online_segments(every: float) -> list[float]:
  """Segment ends of an online schedule: every `every` of the budget, the last at 1."""
  if not 0 < every <= 1:
    raise UserError(f"online.every={every} must be in (0, 1]")
  n = max(1, round(1.0 / every))
  return [min(1.0, (k + 1) / n) for k in range(n)]


def online_stages(every: float, decisions: list[dict], bucket: int, model_cfg,
                  overhead_units: float, final_full: bool = False) -> tuple[list[Stage],
                                                                     list[float]]:
  """Stages and overheads of an online schedule: decided segments run their chosen strategy; the
  rest are projected with the last choice (full length before the first) and the same
  measurement overhead, so the plan's step count is a forecast until the last decision. With
  `final_full` the last segment is full length without a measurement (search.final_full)."""
  stages, overheads = [], []
  current = "full|full"
  ends = online_segments(every)
  for k, end in enumerate(ends):
    if k < len(decisions):
      current = decisions[k]["strategy"]
      overheads.append(decisions[k]["overhead_units"])
    elif final_full and k == len(ends) - 1:
      current = "full|full"
      overheads.append(0.0)
    else:
      overheads.append(overhead_units)
    stages.append(Stage(end, compression.parse_checked(current, bucket, model_cfg, "online")))
  return stages, overheads


# ------------------------------------------------------------------------- from the config
def step_cost_units(config, strategies: BranchStrategies) -> float:
  """Per-sample cost of one train step in base-forward units (1 = one uncompressed backbone forward
  on one image), from the analytic cost model (compression.branches_cost_units) over the branches
  the objective runs."""
  branches = objectives.get(config.objective).cost_branches(config, strategies)
  return compression.branches_cost_units(config.model, branches)


def candidates(config, key: str) -> list[BranchStrategies]:
  """Full length first (the reference every comparison needs), then the distinct specs of the
  config key `key` ('online.candidates', 'grad_error.candidates' or
  'compression.cost_candidates'), each checked against the model; errors name the key."""
  section, name = key.split(".")
  return compression.full_then_candidates(config[section][name], config.compression.bucket,
                                          config.model, key)


def schedule_text(config) -> str:
  """The schedule: the contents of `schedule_file` when set (e.g. written by --mode=search), else
  `schedule` (a preset name or 'END:SPEC; ...'). Raises UserError for an unreadable or empty
  file."""
  path = config.schedule_file
  if not path:
    return config.schedule
  try:
    with open(os.path.expanduser(path)) as f:
      text = " ".join(line.split("#")[0].strip() for line in f)
  except OSError as e:
    raise UserError(f"schedule_file={path!r} cannot be read ({e.strerror}); write one with "
                    f"--mode=search or clear schedule_file") from None
  if not text.strip():
    raise UserError(f"schedule_file={path!r} holds no schedule")
  return text


def _prior(config) -> list[Stage] | None:
  if not str(config.search.prior).strip():
    return None
  return parse_schedule(config.search.prior, config.compression.bucket, config.model,
                        "search.prior")


def prior_stages(config, measured: Iterable[str] | None = None
                 ) -> list[tuple[float, str]] | None:
  """`search.prior` as [(stage end, strategy spec)] (schedule_search.prior_at reads it), or None
  when it is ''. With `measured` (the specs of the measured strategies: a config's candidates, or
  the rows of gradient-error tables, which may have been measured under other spellings), each
  stage's spec is spelled as the measured one that runs the same program
  (BranchStrategies.canonical), so it names a row of their tables. Raises UserError (naming
  search.prior) for a prior that is not a schedule."""
  stages = _prior(config)
  if stages is None:
    return None
  bucket = config.compression.bucket
  spelled = {BranchStrategies.parse(spec, bucket).canonical(): spec for spec in measured or ()}
  return [(s.end, spelled.get(s.strategies.canonical(), s.strategies.spec)) for s in stages]


def check_prior_measured(config, key: str) -> None:
  """UserError unless every strategy of `search.prior` is among the candidates `key` measures
  (full length always is): a prior strategy without a measurement cannot be weighed."""
  measured = {st.canonical() for st in candidates(config, key)}
  missing = sorted({s.strategies.spec for s in _prior(config) or ()
                    if s.strategies.canonical() not in measured})
  if missing:
    them = "it" if len(missing) == 1 else "them"
    raise UserError(f"search.prior={config.search.prior!r} runs {', '.join(missing)}, which "
                    f"{key} does not measure; add {them} to {key} or set search.prior=''")


def is_online(config) -> bool:
  return schedule_text(config).strip() == ONLINE


def schedule_stages(config) -> list[Stage]:
  """The stages of a fixed schedule; an online schedule's before any decision (all full length)."""
  if is_online(config):
    candidates(config, "online.candidates")   # checked at config time
    return online_stages(config.online.every, [], config.compression.bucket, config.model, 0.0)[0]
  return parse_schedule(schedule_text(config), config.compression.bucket, config.model)


def budget_units(config, num_train_examples: int) -> float:
  """`budget` (base-forward units) when set, else `budget_epochs` full-cost epochs: that many passes
  over the train split with the uncompressed step."""
  if config.budget > 0:
    return float(config.budget)
  full = BranchStrategies.parse("full|full")
  return float(config.budget_epochs) * num_train_examples * step_cost_units(config, full)


def measurement_units(config, strategies: list[BranchStrategies], reference_batches: int,
                      batches: int) -> float:
  """Budget units one gradient-error measurement spends (grad_error.measure): a gradient costs
  what a train step of its strategy costs (forward + backward of the gradient branch, forward of
  the other); `reference_batches` at full length (strategies[0]), `batches` per other strategy."""
  full, others = strategies[0], strategies[1:]
  per_sample = (reference_batches * step_cost_units(config, full)
                + batches * sum(step_cost_units(config, st) for st in others))
  return per_sample * config.batch_size


def prior_displaceable(config, key: str, reference_batches: int, batches: int,
                       rounds: int = 1) -> tuple[bool, int]:
  """(whether measurements of `reference_batches` full-length and `batches` batches per candidate,
  pooled over `rounds` rounds, could let some candidate of `key` displace search.prior's strategy,
  the batches that takes: schedule_search.batches_to_displace for every candidate but one against
  the prior at grad_error.ci_level; the monotone rule may allow fewer, so this errs towards
  measuring). (True, 0) without a prior. A comparison rests on the fewer of the two rows'
  batches: candidates against a compressed prior stage on `batches`, anything against full
  length (its row is the reference batches) on both. Where the answer is False, measuring cannot
  change the schedule: the pilot and the online schedule then measure nothing and follow the
  prior."""
  stages = _prior(config)
  if stages is None:
    return True, 0
  needed = schedule_search.batches_to_displace(len(candidates(config, key)) - 1,
                                               float(config.grad_error.ci_level))
  compressed = any(not s.strategies.is_full for s in stages)
  n = int(batches) if compressed else min(int(reference_batches), int(batches))
  return n * max(1, int(rounds)) >= needed, needed


def online_measurement(config, num_train_examples: int) -> tuple[bool, str]:
  """(whether the online schedule measures before its decisions, why not where it does not).

  It measures where the measurements could change a decision and the budget pays for them: one
  round of online.reference_batches + online.batches per decision (every segment but a final
  full-length one under search.final_full) may cost at most online.measure_fraction of the
  budget (budget_units), and those batches must be enough to displace search.prior
  (prior_displaceable). Where either fails the schedule follows the prior, unmeasured, at no cost.
  Raises UserError, before anything trains, when there is no prior to follow and the budget does
  not pay for the measurements."""
  cfg = config.online
  displaceable, needed = prior_displaceable(config, "online.candidates", cfg.reference_batches,
                                            cfg.batches)
  if not displaceable:
    return False, (f"online.reference_batches={cfg.reference_batches} / online.batches="
                   f"{cfg.batches} cannot displace it (that takes >= {needed} batches each at "
                   f"grad_error.ci_level={float(config.grad_error.ci_level):g})")
  decisions = len(online_segments(cfg.every)) - (1 if config.search.final_full else 0)
  units = decisions * measurement_units(config, candidates(config, "online.candidates"),
                                        cfg.reference_batches, cfg.batches)
  share = units / budget_units(config, num_train_examples)
  if share <= float(cfg.measure_fraction):
    return True, ""
  why = (f"its {decisions} measurement(s) of {cfg.reference_batches} + {cfg.batches} batches "
         f"would cost {share:.1%} of the budget, above online.measure_fraction="
         f"{float(cfg.measure_fraction):g}")
  if _prior(config) is None:
    raise UserError(f"schedule=online: {why}, and without search.prior there is nothing to "
                    f"follow unmeasured; raise the budget or online.measure_fraction, measure "
                    f"fewer online.candidates or batches, or set search.prior")
  return False, why


def online_measures(config, num_train_examples: int) -> bool:
  """Whether the online schedule measures before its decisions (online_measurement); if not, it
  follows search.prior."""
  return online_measurement(config, num_train_examples)[0]


def online_overhead_units(config, num_train_examples: int) -> float:
  """Budget units one online decision's measurement costs (0 when it does not measure:
  online_measurement)."""
  if not online_measures(config, num_train_examples):
    return 0.0
  return measurement_units(config, candidates(config, "online.candidates"),
                           config.online.reference_batches, config.online.batches)


def make_step_plan(config, num_train_examples: int, decisions=()) -> StepPlan:
  """The step plan; for an online schedule, from the decisions taken so far (the rest projected).
  Raises UserError when the budget cannot give every stage a step."""
  budget = budget_units(config, num_train_examples)
  cost = lambda st: step_cost_units(config, st)  # noqa: E731
  if is_online(config):
    stages, overheads = online_stages(config.online.every, list(decisions),
                                      config.compression.bucket, config.model,
                                      online_overhead_units(config, num_train_examples),
                                      bool(config.search.final_full))
    return make_plan(stages, budget, config.batch_size, cost, config.model, overheads)
  return make_plan(schedule_stages(config), budget, config.batch_size, cost, config.model)


def local_crops_by_step(config, plan: StepPlan) -> tuple[tuple[int, int], ...] | None:
  """((end_step, local crops the stage uses), ...) per stage, for the input pipeline to skip the
  local crops a stage does not train on ('crops<N>'); None when every stage uses all of them, the
  recipe has none, or the schedule is online (a later decision may want crops the stream would
  not have made). Source of the counts: BranchStrategies.local_crops (None = all)."""
  total = int(config.aug.local_crops)
  if not total or is_online(config):
    return None
  table = tuple((stage.end_step, total if stage.strategies.local_crops is None
                 else min(stage.strategies.local_crops, total)) for stage in plan.stages)
  return table if any(n < total for _, n in table) else None


@dataclasses.dataclass(frozen=True)
class PlanMarks:
  """The steps a plan fixes for the loop: its end, where this invocation stops (stop_at_step), and
  where the extra evaluations (eval.at_progress) and milestone checkpoints fall. Derived again
  whenever the plan changes (an online schedule's decisions)."""
  total_steps: int
  stop_at: int
  eval_steps: frozenset
  milestone_steps: frozenset


def plan_marks(config, plan: StepPlan) -> PlanMarks:
  total = plan.total_steps
  at = lambda fractions: frozenset(plan.step_at_progress(f) for f in fractions)  # noqa: E731
  return PlanMarks(total_steps=total,
                   stop_at=total if config.stop_at_step <= 0 else min(total, config.stop_at_step),
                   eval_steps=at(config.eval.at_progress),
                   milestone_steps=at(config.checkpoint.at_progress))
