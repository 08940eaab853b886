"""The run, built once for every mode: config checks, mesh, data sources and this host's shard, the
step plan, model, optimiser, and the train state's abstract layout and shardings.

Like MaxText's shared set-up of the train loop, but returning a frozen dataclass instead of a tuple,
so a mode reads `run.plan` or `run.state_shardings` by name. Nothing is created on a device here:
the state is built (or restored) into `state_shardings` by whoever needs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from absl import logging

from vit_accel import checkpointing, config_checks, optimizer, state, step_plan
from vit_accel import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What every mode shares. The sources, host shard and plan are None where build() was asked not
  to make them (see build)."""
  config: Any
  mesh: jax.sharding.Mesh
  model: Any                     # flax module: backbone + the objective's heads
  tx: Any                        # optax.GradientTransformation
  init_state: Callable           # rng -> TrainState (jit it with out_shardings=state_shardings)
  abstract_state: Any            # TrainState of jax.ShapeDtypeStruct
  state_shardings: Any           # TrainState of NamedSharding
  train_source: Any = None       # input_pipeline.sources.InMemory | ImageFiles | TfdsSplit
  test_source: Any = None
  host_shard: Any = None         # input_pipeline.pipeline.HostShard: this process's part
  plan: step_plan.StepPlan | None = None

  @property
  def restore_target(self):
    """The abstract state with its shardings: what a checkpoint is restored into."""
    return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

  def fresh_state(self):
    """A new TrainState created directly in its shardings, from the config's seed."""
    return jax.jit(self.init_state, out_shardings=self.state_shardings)(
        jax.random.key(self.config.seed))


def build(config, *, splits: tuple[str, ...] = ("train", "test"), training: bool = True) -> RunSetup:
  """Checks the config (UserError naming the key), reads the data `splits` (before anything
  compiles: a bad image folder fails here), builds the mesh, and with `training` checks the batch
  against the devices and, given the train split, makes the host shard and the step plan; then
  model, optimiser and state layout. Identical on every host. `--mode=eval` builds without
  `training` (any device count evaluates), `--mode=cost` without splits (no TensorFlow)."""
  config_checks.validate_config(config)
  inputs = {}
  if splits:
    # Lazy: the input pipeline imports TensorFlow, which --mode=cost and the GPU benchmark avoid.
    from input_pipeline import pipeline
    inputs = {f"{split}_source": pipeline.load_source(config, split) for split in splits}
  mesh = sharding_lib.make_mesh(config)
  if training:
    sharding_lib.check_batch(config.batch_size, mesh)
    if "train_source" in inputs:
      inputs["host_shard"] = pipeline.HostShard(jax.process_index(), jax.process_count(),
                                                config.batch_size)
      inputs["plan"] = step_plan.make_step_plan(config, inputs["train_source"].num_examples)
  logging.info("mesh %s on %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform, jax.process_count())
  model = state.build_model(config)
  tx = optimizer.make_optimizer(config)
  init_state, abstract_state, state_shardings = state.state_layout(config, model, tx, mesh)
  return RunSetup(config=config, mesh=mesh, model=model, tx=tx, init_state=init_state,
                  abstract_state=abstract_state, state_shardings=state_shardings, **inputs)
