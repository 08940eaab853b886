"""Online adaptive schedule (`schedule="online"`): re-measure CA-MSE during training and switch.

The budget is cut into segments of `online.every`. At the first step of each segment the scheduler
measures, at the current parameters, the gradient error of full length and of `online.candidates`
(grad_error.measure on `online.reference_batches` + `online.batches` batches drawn from a stream
separate from training's), and the segment runs the strategy with the lowest CA-MSE (ties within
`plan.tie_tolerance` -> the cheaper). The measurement's compute is charged to the budget before the
segment (its units are known in advance), so an online run spends the same budget as any other.

Deterministic and identical on every host: the measurement batches are a pure function of (seed,
step), gradients are global arrays gathered to every host, and the choice is an argmin over the same
numbers. Decisions are stored in each checkpoint's metadata; a resumed run rebuilds its plan from
them and makes any decision still due exactly as the uninterrupted run would.
"""
from __future__ import annotations

import time

import jax
from absl import logging

from vit_accel import compression, grad_error, planner
from vit_accel import sharding as sharding_lib
from vit_accel.compression import BranchStrategies

# Measurement batches come from the training stream's positions far beyond any run's end: same
# distribution, never the batches training uses.
MEASUREMENT_STREAM_OFFSET = 10**9


def candidate_strategies(config) -> list[BranchStrategies]:
  return compression.full_then_candidates(config.online.candidates, config.compression.bucket,
                                          config.model, "online.candidates")


def overhead_units(config) -> float:
  """Budget units one decision's measurement costs."""
  return grad_error.measurement_units(config, candidate_strategies(config),
                                      config.online.reference_batches, config.online.batches)


class OnlineScheduler:

  def __init__(self, config, model, mesh, state_shardings, train_source, split):
    from vit_accel import train_step
    self.config = config
    self.mesh = mesh
    self.train_source = train_source
    self.split = split
    self.strategies = candidate_strategies(config)
    self.grad_fns = grad_error.make_grad_fns(config, model, self.strategies, state_shardings, mesh)
    self.costs = {st: train_step.step_cost_units(config, st) for st in self.strategies}
    self.overhead = overhead_units(config)

  def decide(self, state, step: int, segment: int, progress: float) -> dict:
    """The decision for `segment`, measured at `state` (the parameters after `step` steps, at budget
    `progress`)."""
    from input_pipeline import pipeline
    t0 = time.time()
    cfg = self.config.online
    stream = pipeline.train_dataset(self.train_source, self.config, self.split,
                                    start_step=MEASUREMENT_STREAM_OFFSET + step).as_numpy_iterator()
    batches = [sharding_lib.host_to_global(next(stream), self.mesh)
               for _ in range(cfg.reference_batches + cfg.batches)]
    rows = grad_error.measure(self.config, state, batches, cfg.reference_batches, self.grad_fns,
                              self.costs,
                              jax.random.fold_in(jax.random.key(self.config.seed), 104729 + step),
                              progress)
    winner = planner.pick(rows, float(self.config.plan.tie_tolerance))
    decision = {"segment": segment, "step": step, "strategy": winner["strategy"],
                "overhead_units": self.overhead,
                "ca_mse": {r["strategy"]: r["ca_mse"] for r in rows},
                "bias2": {r["strategy"]: r["bias2"] for r in rows},
                "seconds": time.time() - t0}
    logging.info("online decision %d at step %d: %s (CA-MSE %s), %.1fs", segment, step,
                 winner["strategy"], {k: round(v, 4) for k, v in decision["ca_mse"].items()},
                 decision["seconds"])
    return decision
