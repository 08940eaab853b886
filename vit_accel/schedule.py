"""Schedules as functions of training progress (fraction of the run done, 0..1)."""
from __future__ import annotations

import optax


def learning_rate_schedule(config, total_steps: int):
  """Linear warmup to the peak lr, then cosine decay to `lr_end_factor` x peak.

  Peak lr follows the linear scaling rule of MoCo-v3 / DINO: base_lr x batch_size / 256.
  """
  peak = config.optim.base_lr * config.batch_size / 256.0
  warmup = int(round(config.optim.warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=max(warmup, 1),
      decay_steps=max(total_steps, warmup + 1), end_value=peak * config.optim.lr_end_factor)


def total_steps(config, num_train_examples: int) -> int:
  """Steps of the run: `total_steps` when set (> 0), else num_epochs over the train split."""
  if config.get("total_steps", 0) and config.total_steps > 0:
    return int(config.total_steps)
  return max(1, int(config.num_epochs * num_train_examples // config.batch_size))
