"""The optimiser (AdamW, Loshchilov & Hutter 2019, via optax) and its learning-rate schedule on budget
progress."""
from __future__ import annotations

import math

import flax
import jax.numpy as jnp
import optax


def make_optimizer(config):
  """AdamW at unit learning rate; the step scales its updates by the lr of the current budget
  progress (learning_rate_at below), which is exactly AdamW with that lr. No weight decay on
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


def learning_rate_at(config, progress):
  """Linear warmup to the peak lr over `warmup_fraction` of the budget, then cosine decay to
  `lr_end_factor` x peak. Peak follows MoCo-v3 / DINO's linear scaling: base_lr x batch / 256."""
  peak = config.optim.base_lr * config.batch_size / 256.0
  warmup = config.optim.warmup_fraction
  end = peak * config.optim.lr_end_factor
  progress = jnp.clip(progress, 0.0, 1.0)
  warm = peak * progress / max(warmup, 1e-12)
  t = jnp.clip((progress - warmup) / max(1.0 - warmup, 1e-12), 0.0, 1.0)
  decay = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
  return jnp.where(progress < warmup, warm, decay)
