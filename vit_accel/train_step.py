"""The train step and what it is built from: model, optimiser, state, and its ahead-of-time compile.

Free of the input pipeline (no TensorFlow), so `--mode=cost` and the GPU benchmark can build and time
steps on synthetic batches.
"""
from __future__ import annotations

import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vit_accel import checkpointing, compression, config_domains, schedule
from vit_accel import sharding as sharding_lib
from vit_accel.compression import BranchStrategies
from vit_accel.errors import UserError
from vit_accel.models.vit import VisionTransformer
from vit_accel import objectives
from vit_accel.objectives import ema


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any       # the trained network: backbone + the objective's heads
  ema_params: Any   # EMA of the objective's EMA_PARTS (MoCo key encoder, DINO teacher; {} = none)
  extra: Any        # the objective's other state carried between steps (DINO's centre; {} = none)
  opt_state: Any


# `eval.weights`: which copy of the backbone evaluation reads ("" = the objective's own choice).
EVAL_WEIGHTS = {"online": "params", "ema": "ema_params"}


def eval_params(config, state):
  """The weights evaluation reads: the objective's choice (the trained network; DINO: the EMA
  teacher), or the copy `eval.weights` names ('online' or 'ema'; e.g. DINO's student, to see whether
  the teacher keeps up). Works on a TrainState of shardings too."""
  which = config.eval.get("weights", "")
  return getattr(state, EVAL_WEIGHTS[which] if which else objectives.get(config.objective).EVAL_ON)



# ----------------------------------------------------------------------------- config checks
def validate_config(config) -> None:
  """Cheap checks that fail before anything compiles, each naming the key and the fix: every value
  in its domain (config_domains.DOMAINS), then the rules that tie keys together."""
  config_domains.check(config)
  objective = objectives.get(config.objective)
  if config.objective not in config:
    raise UserError(f"objective={config.objective!r} needs a config section "
                    f"'{config.objective}'; start from configs/fmnist_{config.objective}.py")
  if hasattr(objective, "validate_config"):
    objective.validate_config(config)
  weights = config.eval.get("weights", "")
  if weights == "ema" and "backbone" not in objective.EMA_PARTS:
    raise UserError(f"eval.weights='ema': objective {config.objective} keeps no EMA copy of the "
                    f"backbone; use 'online' or ''")
  m = config.model
  if m.patch_size <= 0 or m.image_size % m.patch_size:
    raise UserError(f"model.patch_size={m.patch_size} does not tile model.image_size="
                    f"{m.image_size}; use a divisor of {m.image_size}")
  if m.width % m.num_heads:
    raise UserError(f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}")
  if num_local_crops(config):
    local = config.aug.local_size
    if local <= 0 or local % m.patch_size or local > m.image_size:
      raise UserError(f"aug.local_size={local} must be a positive multiple of model.patch_size="
                      f"{m.patch_size} and at most model.image_size={m.image_size}")
  schedule_stages(config)
  if config.get("budget", -1) <= 0 and config.get("budget_epochs", -1) <= 0:
    raise UserError("set budget (base-forward units) or budget_epochs (full-cost epochs) > 0")
  for spec in config.compression.cost_candidates:
    compression.parse_checked(spec, config.compression.bucket, m, "compression.cost_candidates")
  for spec in config.get("grad_error", {}).get("candidates", ()):
    compression.parse_checked(spec, config.compression.bucket, m, "grad_error.candidates")


def schedule_text(config) -> str:
  """The schedule: the contents of `schedule_file` when set (e.g. written by --mode=plan), else
  `schedule` (a preset name or 'END:SPEC; ...')."""
  path = config.get("schedule_file", "")
  if not path:
    return config.schedule
  try:
    with open(os.path.expanduser(path)) as f:
      text = " ".join(l.split("#")[0].strip() for l in f)
  except OSError as e:
    raise UserError(f"schedule_file={path!r} cannot be read ({e.strerror}); write one with "
                    f"--mode=plan or clear schedule_file") from None
  if not text.strip():
    raise UserError(f"schedule_file={path!r} holds no schedule")
  return text


def schedule_stages(config) -> list[schedule.Stage]:
  """The stages of a fixed schedule; an online schedule's before any decision (all full length)."""
  text = schedule_text(config)
  if text.strip() == schedule.ONLINE:
    for spec in config.online.candidates:
      compression.parse_checked(spec, config.compression.bucket, config.model, "online.candidates")
    return schedule.online_stages(config.online.every, [], config.compression.bucket,
                                  config.model, 0.0)[0]
  return schedule.parse_schedule(text, config.compression.bucket, config.model)


def is_online(config) -> bool:
  return schedule_text(config).strip() == schedule.ONLINE


# ------------------------------------------------------------------------ model and optimiser
def compute_dtype(config):
  """The backbone's activation/matmul dtype; parameters and optimiser state stay float32."""
  return jnp.dtype(config.model.get("dtype", "float32"))


def build_model(config):
  """The objective's network (backbone + heads); every one has `features(images)` for evaluation."""
  m = config.model
  backbone = VisionTransformer(width=m.width, depth=m.depth, num_heads=m.num_heads,
                               mlp_ratio=m.mlp_ratio, patch_size=m.patch_size,
                               image_size=m.image_size, dtype=compute_dtype(config))
  return objectives.get(config.objective).build(config, backbone)


def num_local_crops(config) -> int:
  """Multi-crop: local crops per image besides the two global views (0 = two views only)."""
  return int(config.aug.get("local_crops", 0))


def batch_shapes(config) -> dict:
  """The train batch's structure, global uint8 shapes: two global views, and the local crops when
  the recipe has them (their own, smaller side)."""
  size, b = config.model.image_size, config.batch_size
  shapes = {"views": ((b, size, size, 3),) * 2}
  if num_local_crops(config):
    local = config.aug.local_size
    shapes["local_views"] = ((b, local, local, 3),) * num_local_crops(config)
  return shapes


def make_optimizer(config):
  """AdamW at unit learning rate; the step scales its updates by the lr of the current budget
  progress (schedule.learning_rate_at), which is exactly AdamW with that lr. No weight decay on
  biases, norms, CLS token and position embedding."""
  def decay_mask(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: (p.ndim > 1 and k[-1] not in ("pos_embed", "cls_token")) for k, p in flat.items()})
  tx = optax.adamw(1.0, b1=config.optim.b1, b2=config.optim.b2,
                   weight_decay=config.optim.weight_decay, mask=decay_mask)
  if config.optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), tx)
  return tx


def normalize_images(images, config):
  """uint8 [B, S, S, 3] -> float32, per-channel standardised (done on device, not in tf.data)."""
  mean = jnp.asarray(config.data.mean, jnp.float32)
  std = jnp.asarray(config.data.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def init_state_fn(config, model, tx):
  """rng -> a fresh TrainState (jit it with out_shardings to create it directly in place)."""
  size = config.model.image_size

  objective = objectives.get(config.objective)

  def init_state(rng):
    params = model.init(rng, jnp.zeros((2, size, size, 3), jnp.float32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=ema.init(params, objective.EMA_PARTS),
                      extra=objective.init_extra(config), opt_state=tx.init(params))

  return init_state


def state_layout(config, model, tx, mesh):
  """(init_state fn, abstract TrainState, its shardings): shapes first, so the state can be created
  or restored directly into its shardings: replicated, or FSDP-sharded when mesh.fsdp > 1
  (sharding.FSDP_RULES)."""
  init_state = init_state_fn(config, model, tx)
  abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_shardings = sharding_lib.state_shardings(abstract_state, mesh)
  return init_state, abstract_state, state_shardings


def step_cost_units(config, strategies: BranchStrategies) -> float:
  """Per-image cost of one train step in base-forward units (1 = one uncompressed backbone forward
  on one image), from the analytic cost model."""
  branches = objectives.get(config.objective).cost_branches(config, strategies)
  return compression.step_cost_units(config.model, branches)


def dropout_rng(config, step):
  """Token-keep randomness of a step: a pure function of (seed, step), so resumed runs and every
  host draw the same tokens."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), step)


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


def make_train_step(config, model, tx, strategies: BranchStrategies = BranchStrategies()):
  """The step for one compression strategy pair (one static-shaped program). `progress` (budget
  units spent / budget, a float32 scalar from the step plan) drives lr and momentum."""
  loss_fn = make_loss_fn(config, model, strategies)
  objective = objectives.get(config.objective)

  def train_step(state: TrainState, batch, progress):
    lr = schedule.learning_rate_at(config, progress)
    momentum = objective.momentum(config, progress)
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


