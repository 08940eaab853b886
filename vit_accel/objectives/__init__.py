"""Self-supervised objectives, selected by `config.objective` (mocov3 | simclr | dino).

Each objective module is a set of pure functions the trainer calls; none of them owns state:
  EMA_PARTS                   parameter subtrees an EMA copy tracks (MoCo key / DINO teacher; () = none)
  EVAL_ON                     "params" or "ema_params": which weights evaluation reads (DINO: teacher)
  LOCAL_CROPS                 whether the objective uses local crops (multi-crop; a spec's LOCAL part)
  build(config, backbone)     -> linen module with `features(images, strategy, rng)` (the CLS feature)
  init_extra(config)          -> dict of non-parameter state carried between steps (DINO: centre)
  momentum(config, progress)  -> the EMA momentum at this budget progress
  loss(model, params, ema_params, extra, views, config, strategies, rng, progress)
                              -> (loss, (new_extra, metrics)); `views` = normalised float views,
                                 {"views": (global...), "local_views": (local...)}
  cost_branches(config, strategies) -> compression.Branch list of one step per sample (cost model)
  validate_config(config)     (optional) objective-specific checks: UserError naming the key
"""
from __future__ import annotations

import importlib

from vit_accel.errors import UserError

OBJECTIVES = ("mocov3", "simclr", "dino")


def get(name: str):
  """The objective module for `config.objective`."""
  if name not in OBJECTIVES:
    raise UserError(f"unknown objective={name!r}; available: {', '.join(OBJECTIVES)}")
  return importlib.import_module(f"vit_accel.objectives.{name}")
