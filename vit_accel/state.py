"""The train state and what it is made of: the objective's network, its parameters, EMA copy and
optimiser state, laid out (shapes and shardings) before anything is created."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from vit_accel import objectives
from vit_accel import sharding as sharding_lib
from vit_accel.models.vit import VisionTransformer
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
  which = config.eval.weights
  return getattr(state, EVAL_WEIGHTS[which] if which else objectives.get(config.objective).EVAL_ON)


def compute_dtype(config):
  """The backbone's activation/matmul dtype; parameters and optimiser state stay float32."""
  return jnp.dtype(config.model.dtype)


def build_model(config):
  """The objective's network (backbone + heads); every one has `features(images)` for evaluation."""
  m = config.model
  backbone = VisionTransformer(width=m.width, depth=m.depth, num_heads=m.num_heads,
                               mlp_ratio=m.mlp_ratio, patch_size=m.patch_size,
                               image_size=m.image_size, dtype=compute_dtype(config),
                               attention=m.attention, attention_pad_to=m.attention_pad_to,
                               remat=m.remat)
  return objectives.get(config.objective).build(config, backbone)


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
