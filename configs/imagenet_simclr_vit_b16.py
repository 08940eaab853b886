"""SimCLR ViT-B/16 (or ViT-S/16: `:vit_s16`) on ImageNet-1k, with the accelerated schedule.

  python main.py --config=configs/imagenet_simclr_vit_b16.py --workdir=$RUN --config.data.dir=$DATA

SimCLR's objective and augmentations (NT-Xent over the global batch, 3-layer projector 4096/256 with
BatchNorm, SimCLR colour recipe at strength 1, blur on both views) with the ViT optimisation recipe
MoCo-v3 used for its SimCLR ViT baseline: batch 4096, AdamW lr 1.5e-4 x batch/256, weight decay 0.1,
300 epochs, 40 of warm-up. Temperature 0.2 (SimCLR's 0.1 was tuned for ResNet-50 with LARS).
"""
import ml_collections

from configs import imagenet_common
from input_pipeline import recipes


def get_config(arg: str | None = None):
  c = imagenet_common.base(arg, batch_size=4096, epochs=300, warmup_epochs=40, lr_per_256=1.5e-4,
                           weight_decay=0.1)
  c.objective = "simclr"
  c.simclr = ml_collections.ConfigDict(dict(temperature=0.2, proj_hidden_dim=4096, out_dim=256,
                                            proj_layers=3))
  c.aug = recipes.simclr(strength=1.0, image_size=224)
  return c
