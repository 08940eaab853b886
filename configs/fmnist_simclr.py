"""SimCLR pretraining of the small ViT on the embedded Fashion-MNIST.

  python main.py --config=configs/fmnist_simclr.py --workdir=/tmp/fmnist_simclr
  python main.py --config=configs/fmnist_simclr.py:smoke --workdir=/tmp/smoke_simclr

Everything but the objective comes from the shared base (configs/base.py: data, ViT, schedule,
budget, evaluation), as in the MoCo-v3 recipe (configs/fmnist_mocov3.py). SimCLR: backbone +
3-layer projector, NT-Xent over the global batch; both views carry gradients, so both run the
stage's gradient-branch strategy (the 'QUERY' half of a 'QUERY|KEY' spec). Augmentations: the
SimCLR recipe at strength 0.5 (its colour ops are no-ops on grey images) with the MoCo-v3 recipe's
crop scale 0.2-1 and no blur, which suit 32 px grey images.
"""
from configs import base
from input_pipeline import recipes


def get_config(arg: str | None = None):
  smoke = base.is_smoke(arg)
  c = base.get_config()
  c.objective = "simclr"
  # SimCLR's step has no forward-only key branch (2 views with gradient, 6 units per image vs
  # MoCo-v3's 8), so the same run time buys more full-cost epochs.
  c.budget_epochs = 1.1
  c.simclr = dict(temperature=0.2, proj_hidden_dim=1024, out_dim=256, proj_layers=3)
  if smoke:
    base.apply_smoke(c)
    c.budget_epochs = 0.013
    c.simclr.proj_hidden_dim = 256
    c.simclr.out_dim = 64

  c.aug = recipes.simclr(strength=0.5, image_size=c.model.image_size)
  c.aug.crop_scale = (0.2, 1.0)
  c.aug.blur_p = (0.0, 0.0)
  return c
