"""The train step: the objective's loss under one compression strategy pair, its gradient, the AdamW
update and the EMA update, compiled ahead of time per strategy pair.

Free of the input pipeline (no TensorFlow), so `--mode=cost` and the GPU benchmark can build and time
steps on synthetic batches.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from vit_accel import checkpointing, objectives, optimizer, rng_streams, step_plan
from vit_accel import sharding as sharding_lib
from vit_accel.compression import BranchStrategies
from vit_accel.objectives import ema
from vit_accel.state import TrainState


def num_local_crops(config) -> int:
  """Multi-crop: local crops per image besides the two global views (0 = two views only)."""
  return int(config.aug.local_crops)


def batch_shapes(config) -> dict:
  """The train batch's structure, global uint8 shapes: two global views, and the local crops when
  the recipe has them (their own, smaller side)."""
  size, b = config.model.image_size, config.batch_size
  shapes = {"views": ((b, size, size, 3),) * 2}
  if num_local_crops(config):
    local = config.aug.local_size
    shapes["local_views"] = ((b, local, local, 3),) * num_local_crops(config)
  return shapes


def normalize_images(images, config):
  """uint8 [B, S, S, 3] -> float32, per-channel standardised (done on device, not in tf.data)."""
  mean = jnp.asarray(config.data.mean, jnp.float32)
  std = jnp.asarray(config.data.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def dropout_rng(config, step):
  """Token-keep randomness of a step: a pure function of (seed, step), so resumed runs and every
  host draw the same tokens."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), rng_streams.TOKEN_KEEP),
                            step)


def make_loss_fn(config, model, strategies: BranchStrategies = BranchStrategies()):
  """(params, ema_params, extra, batch of uint8 views, rng, progress) -> (loss, (new extra,
  metrics)): the objective's loss under `strategies`; `rng` picks the kept tokens, `progress` drives
  the objective's schedules (DINO's teacher temperature). Shared by the train step and the
  gradient-error analysis."""
  objective = objectives.get(config.objective)

  def loss_fn(params, ema_params, extra, batch, rng, progress):
    views = jax.tree.map(lambda v: normalize_images(v, config), batch)
    return objective.loss(model, params, ema_params, extra, views, config, strategies, rng,
                          progress)

  return loss_fn


def ema_exponent(config, strategies: BranchStrategies) -> float:
  """The power the EMA momentum is raised to in a step of `strategies`: step cost / full-length
  step cost (analytic, per sample) when `compression.ema_per_budget`, else 1.

  A compressed stage runs more, cheaper steps per unit of budget; with momentum m ** (cost ratio)
  per step the EMA (MoCo-v3's key encoder, DINO's teacher) averages over the same share of the
  budget at every stage, as it does in the uncompressed baseline. 1.0 at full length."""
  if not config.compression.ema_per_budget:
    return 1.0
  return (step_plan.step_cost_units(config, strategies)
          / step_plan.step_cost_units(config, BranchStrategies()))


def make_train_step(config, model, tx, strategies: BranchStrategies = BranchStrategies()):
  """The step for one compression strategy pair (one static-shaped program). `progress` (budget
  units spent / budget, a float32 scalar from the step plan) drives lr and momentum."""
  loss_fn = make_loss_fn(config, model, strategies)
  objective = objectives.get(config.objective)
  exponent = ema_exponent(config, strategies)   # a Python float: static in the program

  def train_step(state: TrainState, batch, progress):
    lr = optimizer.learning_rate_at(config, progress)
    momentum = objective.momentum(config, progress)
    if exponent != 1.0:
      momentum = momentum ** exponent
    (loss, (extra, objective_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.ema_params, state.extra, batch, dropout_rng(config, state.step),
        progress)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": lr, "momentum": momentum,
               "grad_norm": optax.global_norm(grads), **objective_metrics}
    return TrainState(step=state.step + 1, params=params,
                      ema_params=ema.update(state.ema_params, params, momentum), extra=extra,
                      opt_state=opt_state), metrics

  return train_step


def compile_train_step(config, model, tx, strategies: BranchStrategies, mesh, abstract_state,
                       state_shardings):
  """The step for `strategies`, jitted with explicit shardings (state donated) and compiled ahead of
  time for a global uint8 batch; returns (compiled step, compile seconds)."""
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {name: tuple(jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=batch_sharding)
                      for shape in shapes) for name, shapes in batch_shapes(config).items()}
  step_fn = jax.jit(make_train_step(config, model, tx, strategies),
                    in_shardings=(state_shardings, batch_sharding, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(checkpointing.abstract_with_shardings(abstract_state, state_shardings),
                           batch,
                           jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)).compile()
  return compiled, time.perf_counter() - t0


