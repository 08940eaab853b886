"""DINO ViT-B/16 (or ViT-S/16: `:vit_s16`) on ImageNet-1k, with multi-crop and the accelerated
schedule on the student's views (the teacher sees full-length global crops).

  python main.py --config=configs/imagenet_dino_vit_b16.py --workdir=$RUN --config.data.dir=$DATA

DINO's published ViT-B/16 recipe: batch 1024, AdamW lr 7.5e-4 x batch/256 (ViT-S/16: 5e-4), 400
epochs (ViT-S/16: 300) with 10 of warm-up, teacher momentum 0.996 -> 1, teacher temperature 0.04 -> 0.07
over the first 50 epochs (ViT-S/16: 30), student 0.1, centre momentum 0.9, head 2048 -> bottleneck 256
-> 65536 with a weight-normalised last layer (kept fixed-norm for ViT-B, learnable for ViT-S), frozen for
the first 3 epochs (ViT-S: 1), gradient clip 3, 2 global crops (scale 0.25-1; ViT-S 0.4-1) + 10 local
crops at 96 px (scale 0.05-0.25; ViT-S 0.05-0.4).
Not reproduced: the weight-decay ramp 0.04 -> 0.4 (held at 0.04 here) and stochastic depth.
"""
import ml_collections

from configs import imagenet_common
from input_pipeline import recipes


def get_config(arg: str | None = None):
  small = arg == "vit_s16"
  epochs, warmup_teacher = (300, 30) if small else (400, 50)
  c = imagenet_common.base(arg, batch_size=1024, epochs=epochs, warmup_epochs=10,
                           lr_per_256=5e-4 if small else 7.5e-4, weight_decay=0.04)
  c.objective = "dino"
  c.optim.grad_clip = 3.0
  c.dino = ml_collections.ConfigDict(dict(
      out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3,
      norm_last_layer=not small, head_bn=False, head_batch="per_view",
      student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
      warmup_teacher_temp_fraction=warmup_teacher / epochs,
      center_momentum=0.9, centering="ema", koleo_weight=0.0, base_momentum=0.996,
      final_momentum=1.0,
      freeze_last_layer_fraction=(1 if small else 3) / epochs))
  c.aug = recipes.dino_multicrop(image_size=224, local_crops=10, local_size=96,
                                 global_scale=(0.4, 1.0) if small else (0.25, 1.0),
                                 local_scale=(0.05, 0.4) if small else (0.05, 0.25))
  # The accelerated schedule on the student's views; the teacher stays at full length.
  c.schedule = "0.55:patch32; 0.8:keep0.5; 1:full"
  c.search.prior = c.schedule   # the search keeps it where measurements cannot beat it
  c.grad_error.candidates = ("patch32", "keep0.5", "keep0.25", "patch32|patch32")
  c.online.candidates = ("patch32", "keep0.5")
  return c
