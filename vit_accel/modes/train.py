"""--mode=train: pretrain in WORKDIR, or resume the run there (the trainer: vit_accel/train.py)."""
from __future__ import annotations

from vit_accel import distributed, train
from vit_accel.modes import Args


def run(config, workdir: str, args: Args = Args()) -> dict:
  """The final evaluation's metrics (see train.train_and_evaluate)."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  return train.train_and_evaluate(config, workdir)
