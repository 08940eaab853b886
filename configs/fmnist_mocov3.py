"""MoCo-v3 pretraining of a small ViT on the embedded Fashion-MNIST (the default recipe).

  python main.py --config=configs/fmnist_mocov3.py --workdir=/tmp/fmnist_mocov3
  python main.py --config=configs/fmnist_mocov3.py:smoke --workdir=/tmp/smoke   # < 1 min on CPU

Images: 28x28 grey zero-padded to 32x32, tiled to 3 channels. ViT: width 128, depth 4, 4 heads,
base patch 4 (64 patches + CLS), trained with the accelerated `dynamic` schedule (patch 8, then 50%
token keep, then full length) on a budget sized for ~17 minutes on 2 CPU cores; the README says what
it reaches. `--config.schedule=none` is the uncompressed baseline on the same budget.
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  smoke = base.is_smoke(arg)
  c = base.get_config()          # everything but the objective (data, ViT, schedule, budget, ...)
  c.objective = "mocov3"
  c.mocov3 = ml_collections.ConfigDict()
  c.mocov3.temperature = 0.2
  c.mocov3.base_momentum = 0.99  # cosine to 1 over the run
  c.mocov3.symmetric = True
  c.mocov3.proj_hidden_dim = 1024
  c.mocov3.pred_hidden_dim = 1024
  c.mocov3.out_dim = 256

  if smoke:
    base.apply_smoke(c)
    c.mocov3.proj_hidden_dim = 256
    c.mocov3.pred_hidden_dim = 256
    c.mocov3.out_dim = 64
  return c
