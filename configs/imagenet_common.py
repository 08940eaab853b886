"""What the ImageNet recipes share: TFDS `imagenet2012` from a data_dir, 224 px, ViT-B/16 (or ViT-S/16
with the `vit_s16` argument), bfloat16 compute with float32 parameters, the accelerated schedule.

Not a recipe itself: configs/imagenet_{mocov3,simclr,dino}_vit_b16.py build on it (it builds on
configs/base.py) and add their objective and its section.
Prepare the data once (nothing is ever downloaded at run time):
  tfds build imagenet2012 --data_dir=$DATA   # with ILSVRC2012_img_{train,val}.tar in $DATA/downloads/manual
"""
import ml_collections

from configs import base as shared

ARGS = ("vit_s16",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base(arg: str | None, *, batch_size: int, epochs: float, warmup_epochs: float,
         lr_per_256: float, weight_decay: float) -> ml_collections.ConfigDict:
  if arg and arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; available: {', '.join(ARGS)}")
  c = shared.get_config()   # the full key set; everything ImageNet-specific is set below
  c.batch_size = batch_size
  c.budget_epochs = epochs                       # full-cost epochs of the 1.28M train split
  c.schedule = "dynamic"                         # patch x2 (32 px), then 50% keep, then full
  c.log_every_steps = 100
  c.preemption_check_every_steps = 10

  c.model.image_size = 224
  c.model.patch_size = 16
  c.model.dtype = "bfloat16"                     # compute; parameters and optimiser stay float32
  if arg == "vit_s16":
    c.model.width, c.model.depth, c.model.num_heads = 384, 12, 6
  else:
    c.model.width, c.model.depth, c.model.num_heads = 768, 12, 12
  c.model.mlp_ratio = 4.0

  c.optim.base_lr = lr_per_256                   # x batch_size / 256
  c.optim.warmup_fraction = warmup_epochs / epochs
  c.optim.weight_decay = weight_decay
  c.optim.b1, c.optim.b2 = 0.9, 0.999            # AdamW defaults, as the papers
  c.optim.lr_end_factor = 0.0

  c.data.source = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.dir = "~/tensorflow_datasets"
  c.data.tfds_splits = ml_collections.ConfigDict({"train": "train", "test": "validation"})
  c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD
  c.data.shuffle_buffer = 10_000                 # encoded JPEGs (~110 kB each): ~1.1 GB per host
  c.data.prefetch = 2

  # Candidates for --mode=cost / grad_error / online at base patch 16.
  c.compression.cost_candidates = ("keep0.5", "keep0.25", "patch32", "keep0.5|keep0.5",
                                   "keep0.25|keep0.25", "patch32|patch32", "res112|res112")
  c.grad_error.candidates = ("keep0.5|keep0.5", "keep0.25|keep0.25", "patch32|patch32",
                             "keep0.5", "keep0.25")
  c.online.candidates = ("patch32|patch32", "keep0.5|keep0.5")

  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.at_progress = (0.1, 0.4, 0.7, 0.95)

  # kNN / ridge probe on fixed subsets of train (bank) and validation (queries), held in host
  # memory at 224 px: 25k x 150 kB = 3.7 GB. A subsampled monitor, not the paper's full-train kNN.
  c.eval.every_steps = 5000
  c.eval.at_start = True
  c.eval.bank_size = 10_000
  c.eval.query_size = 5_000
  c.eval.final_bank_size = 25_000
  c.eval.final_query_size = 10_000
  c.eval.batch_size = 1024
  return c
