"""Exponential moving averages of parameter subtrees (MoCo-v3 key encoder, DINO teacher)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def momentum_at(progress, base_momentum: float, final_momentum: float = 1.0):
  """EMA momentum: cosine from `base_momentum` at progress 0 to `final_momentum` (BYOL, MoCo-v3,
  DINO: 1) at progress 1."""
  progress = jnp.clip(progress, 0.0, 1.0)
  return final_momentum - (final_momentum - base_momentum) * (jnp.cos(math.pi * progress) + 1) / 2


def parts_of(params, parts):
  return {name: params[name] for name in parts}


def init(params, parts):
  """A fresh EMA copy of `parts` of `params`."""
  return jax.tree.map(jnp.copy, parts_of(params, parts))


def update(ema_params, params, momentum):
  """ema <- momentum * ema + (1 - momentum) * params, for the subtrees `ema_params` holds."""
  if not ema_params:
    return ema_params
  return optax.incremental_update(parts_of(params, tuple(ema_params)), ema_params,
                                  step_size=1.0 - momentum)
