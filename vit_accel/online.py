"""Online adaptive schedule (`schedule="online"`): re-measure CA-MSE during training and switch.

The budget is cut into segments of `online.every`. At the first step of each segment the scheduler
measures, at the current parameters, the gradient error of full length and of `online.candidates`
(grad_error.measure on `online.reference_batches` + `online.batches` batches drawn from a stream
separate from training's), and the segment runs the strategy --mode=search's rules pick
(schedule_search.choose: the prior schedule's strategy for the segment, `search.prior`, unless a
candidate is below it with confidence on enough batches; lowest CA-MSE, ties -> the cheaper by
`online.ties`; `search.monotone`). When online.reference_batches and online.batches are too few
for any candidate to displace the prior (step_plan.prior_displaceable), or the measurements would
cost more than online.measure_fraction of the budget (step_plan.online_measurement: at the
defaults, budgets below ~2.1 full-cost epochs), nothing is measured and every segment runs the
prior's strategy, at no measurement cost; the
last segment runs at full length unmeasured when `search.final_full` (the default), as a searched
schedule's last stage does. The measurement's compute is charged to the budget before the segment
(its units are known in advance), so an online run spends the same budget as any other.

Deterministic and identical on every host: the measurement batches are a pure function of (seed,
step), gradients are global arrays gathered to every host, and the choice is an argmin over the same
numbers. Decisions are stored in each checkpoint's metadata; a resumed run rebuilds its plan from
them and makes any decision still due exactly as the uninterrupted run would.
"""
from __future__ import annotations

import time

import jax
from absl import logging

from input_pipeline import streams
from vit_accel import grad_error, rng_streams, schedule_search, step_plan


class OnlineScheduler:
  """Measures and takes the decisions of an online schedule for the run `run` (run_setup.RunSetup)."""

  def __init__(self, run):
    config = run.config
    self.config = config
    self.run = run
    self.strategies = step_plan.candidates(config, "online.candidates")
    self.grad_fns = grad_error.make_grad_fns(config, run.model, self.strategies,
                                             run.state_shardings, run.mesh)
    self.costs = {st: step_plan.step_cost_units(config, st) for st in self.strategies}
    num_train = run.train_source.num_examples
    self.overhead = step_plan.online_overhead_units(config, num_train)
    # Measured (config_checks saw to it), spelled as the candidates are.
    self.prior = step_plan.prior_stages(config, [st.spec for st in self.strategies])
    self.measures, self.unmeasured_why = step_plan.online_measurement(config, num_train)

  @staticmethod
  def due(step: int, plan: step_plan.StepPlan, decisions: list) -> bool:
    """Whether the next segment's decision is taken at `step` (its first step)."""
    return len(decisions) < len(plan.stages) and step == plan.stages[len(decisions)].start_step

  def decide(self, state, step: int, decisions: list[dict], progress: float) -> dict:
    """The decision for the next segment (after `decisions`), measured at `state` (the parameters
    after `step` steps, at budget `progress`). The last segment runs at full length without a
    measurement when search.final_full is set, as a searched schedule's does."""
    t0 = time.time()
    cfg = self.config.online
    segment = len(decisions)
    search = self.config.search
    if search.final_full and segment == len(step_plan.online_segments(cfg.every)) - 1:
      logging.info("online decision %d at step %d: full length (search.final_full)", segment, step)
      return {"segment": segment, "step": step, "strategy": self.strategies[0].spec,
              "overhead_units": 0.0, "ca_mse": {}, "bias2": {}, "seconds": 0.0,
              "why": "the last segment runs at full length (search.final_full)"}
    # The prior's strategy where the segment starts by the plan (`progress`, the units spent so
    # far, falls a little short of it: step counts are whole).
    prior = schedule_search.prior_at(self.prior,
                                     ([0.0] + step_plan.online_segments(cfg.every))[segment])
    if not self.measures:
      spec = prior
      why = f"at {progress:.0%}: the prior's {spec}, unmeasured: {self.unmeasured_why}"
      logging.info("online decision %d at step %d: %s", segment, step, why)
      return {"segment": segment, "step": step, "strategy": spec, "overhead_units": 0.0,
              "ca_mse": {}, "bias2": {}, "seconds": 0.0, "why": why}
    stream = streams.global_batches(
        self.run.train_source, self.config, self.run.host_shard, self.run.mesh,
        start_step=rng_streams.MEASUREMENT_STREAM_OFFSET + step)
    next_batches = lambda n: [next(stream) for _ in range(n)]  # noqa: E731
    rng = jax.random.fold_in(jax.random.key(self.config.seed), rng_streams.ONLINE + step)
    # One round: its cost is charged to the budget up front (online_overhead_units).
    rows = grad_error.measure(self.config, state, next_batches, cfg.reference_batches,
                              cfg.batches, self.grad_fns, self.costs, rng, progress,
                              max_rounds=1, seed=self.config.seed * 1_000_003 + step,
                              mesh=self.run.mesh)
    previous = next((r for r in rows if decisions and r["strategy"] == decisions[-1]["strategy"]),
                    None)
    min_cost = schedule_search.relative_cost(previous) if search.monotone and previous else 0.0
    choice = schedule_search.choose(rows, float(search.tie_tolerance), cfg.ties, min_cost,
                                    prior, float(self.config.grad_error.ci_level))
    winner = choice["winner"]
    decision = {"segment": segment, "step": step, "strategy": winner["strategy"],
                "why": schedule_search.describe(progress, choice, rows),
                "ca_mse_ci": {r["strategy"]: r["ca_mse_ci"] for r in rows},
                "overhead_units": self.overhead,
                "ca_mse": {r["strategy"]: r["ca_mse"] for r in rows},
                "bias2": {r["strategy"]: r["bias2"] for r in rows},
                "seconds": time.time() - t0}
    logging.info("online decision %d at step %d: %s (CA-MSE %s), %.1fs", segment, step,
                 winner["strategy"], {k: round(v, 4) for k, v in decision["ca_mse"].items()},
                 decision["seconds"])
    return decision


def metrics_line(decision: dict) -> dict:
  """The `online` metrics line of a decision."""
  return {"online_segment": decision["segment"], "online_choice": decision["strategy"],
          "online_why": decision.get("why", ""),
          "online_overhead_units": decision["overhead_units"],
          "online_measure_s": decision["seconds"],
          **{f"ca_mse/{k}": v for k, v in decision["ca_mse"].items()}}
