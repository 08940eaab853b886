"""The optimiser (AdamW, Loshchilov & Hutter 2019, via optax) and its learning-rate schedule on budget
progress."""
from __future__ import annotations

import flax
import jax.numpy as jnp
import optax

from vit_accel.config_domains import DOMAINS

# AdamW's epsilon (optax's default, named so that grad_error.adam_scale divides by the same).
ADAM_EPS = 1e-8


def decay_mask(params):
  """A tree like `params` (nested dict of arrays): True where weight decay applies, i.e. matrices
  (ndim > 1) except the position embedding and the CLS token; biases and norm scales are exempt
  (MoCo-v3 / DINO / timm's no-weight-decay rule)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: (p.ndim > 1 and k[-1] not in ("pos_embed", "cls_token")) for k, p in flat.items()})


def make_optimizer(config):
  """AdamW at unit learning rate; the step scales its updates by the lr of the current budget
  progress (learning_rate_at below), which is exactly AdamW with that lr. No weight decay on
  biases, norms, CLS token and position embedding (decay_mask)."""
  tx = optax.adamw(1.0, b1=config.optim.b1, b2=config.optim.b2, eps=ADAM_EPS,
                   weight_decay=config.optim.weight_decay, mask=decay_mask)
  if config.optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), tx)
  return tx


DECAYS = DOMAINS["optim.decay"].values   # one list: the config check's


def learning_rate_at(config, progress):
  """The learning rate at budget `progress` (a float or scalar array, fraction of the budget spent;
  clipped to [0, 1]), as a float32 scalar array.

  Linear warm-up from 0 to the peak lr over `optim.warmup_fraction` of the budget, then decay to
  end = `optim.lr_end_factor` x peak over the rest, on t = (progress - warmup) / (1 - warmup):
    cosine (SGDR, Loshchilov & Hutter 2017): end + (peak - end) x (1 + cos(pi t)) / 2
    polynomial: end + (peak - end) x (1 - t) ** `optim.decay_power`; power 2 is the polynomial
      decay Lin et al. 2024 ("Accelerating Augmentation Invariance Pretraining") compare with cosine.
  Peak follows MoCo-v3 / DINO's linear scaling: base_lr x batch / 256. Raises ValueError for an
  `optim.decay` outside DECAYS (config_domains refuses it before this, naming the key)."""
  optim = config.optim
  peak = optim.base_lr * config.batch_size / 256.0
  warmup = optim.warmup_fraction
  end = peak * optim.lr_end_factor
  decay = optim.get("decay", "cosine")   # configs saved before the key decay by cosine
  # optax's step-count schedules, evaluated on t in [0, 1] with one "step" spanning the decay.
  if decay == "cosine":
    schedule = optax.cosine_decay_schedule(peak, decay_steps=1, alpha=optim.lr_end_factor)
  elif decay == "polynomial":
    schedule = optax.polynomial_schedule(peak, end, power=optim.get("decay_power", 2.0),
                                         transition_steps=1)
  else:
    raise ValueError(f"optim.decay={decay!r}; one of {', '.join(DECAYS)}")
  progress = jnp.clip(progress, 0.0, 1.0)
  warm = peak * progress / max(warmup, 1e-12)
  t = jnp.clip((progress - warmup) / max(1.0 - warmup, 1e-12), 0.0, 1.0)
  return jnp.where(progress < warmup, warm, schedule(t))
