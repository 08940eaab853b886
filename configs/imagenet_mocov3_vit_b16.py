"""MoCo-v3 ViT-B/16 (or ViT-S/16: `:vit_s16`) on ImageNet-1k, with the accelerated schedule.

  python main.py --config=configs/imagenet_mocov3_vit_b16.py --workdir=$RUN --config.data.dir=$DATA

The MoCo-v3 paper's ViT recipe: batch 4096, AdamW lr 1.5e-4 x batch/256, weight decay 0.1, 300 epochs
with 40 of warm-up, temperature 0.2, momentum 0.99 -> 1 (cosine), 3-layer projector and 2-layer
predictor of width 4096 with BatchNorm, output 256, BYOL's asymmetric augmentations, crop 0.08-1.
Not reproduced: the frozen random patch embedding (a stability trick; here it trains).
"""
import ml_collections

from configs import imagenet_common
from input_pipeline import recipes


def get_config(arg: str | None = None):
  c = imagenet_common.base(arg, batch_size=4096, epochs=300, warmup_epochs=40, lr_per_256=1.5e-4,
                           weight_decay=0.1)
  c.objective = "mocov3"
  c.mocov3 = ml_collections.ConfigDict()
  c.mocov3.temperature = 0.2
  c.mocov3.base_momentum = 0.99
  c.mocov3.symmetric = True
  c.mocov3.proj_hidden_dim = 4096
  c.mocov3.pred_hidden_dim = 4096
  c.mocov3.out_dim = 256
  c.aug = recipes.byol_asymmetric(image_size=224)
  return c
