"""MoCo-v3 pretraining of a small ViT on the embedded Fashion-MNIST (the default recipe).

  python main.py --config=configs/fmnist_mocov3.py --workdir=/tmp/fmnist_mocov3
  python main.py --config=configs/fmnist_mocov3.py:smoke --workdir=/tmp/smoke   # < 1 min on CPU

Images: 28x28 grey zero-padded to 32x32, tiled to 3 channels. ViT: width 128, depth 4, 4 heads,
patch 4 (64 patches + CLS). Tuned to fit 2 CPU cores in ~15 minutes (see README for what it reaches).
"""
import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.objective = "mocov3"
  c.seed = 0
  c.batch_size = 256             # global
  c.num_epochs = 6.0             # length of the run over the train split
  c.total_steps = -1             # > 0 overrides num_epochs
  c.stop_at_step = -1            # > 0: checkpoint and exit at this step (re-run to continue)
  c.log_every_steps = 20
  c.tensorboard = True

  c.model = ml_collections.ConfigDict()
  c.model.image_size = 32
  c.model.patch_size = 4         # base patch size
  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0

  c.mocov3 = ml_collections.ConfigDict()
  c.mocov3.temperature = 0.2
  c.mocov3.base_momentum = 0.99  # cosine to 1 over the run
  c.mocov3.symmetric = True
  c.mocov3.proj_hidden_dim = 1024
  c.mocov3.pred_hidden_dim = 1024
  c.mocov3.out_dim = 256

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4       # x batch_size / 256
  c.optim.warmup_fraction = 0.1
  c.optim.lr_end_factor = 0.0
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.grad_clip = 0.0

  c.data = ml_collections.ConfigDict()
  c.data.source = "fashion_mnist"
  c.data.dir = ""                # "" = the Debian package's /usr/share/datasets/fashion-mnist
  c.data.mean = (0.286, 0.286, 0.286)   # Fashion-MNIST pixel statistics after padding
  c.data.std = (0.353, 0.353, 0.353)
  c.data.prefetch = 4

  # Two-view recipe for grey images; the colour ops (saturation, hue, greyscale, blur, solarise)
  # are in the op set for colour data and off here.
  c.aug = ml_collections.ConfigDict()
  c.aug.crop_scale = (0.2, 1.0)
  c.aug.crop_ratio = (3 / 4, 4 / 3)
  c.aug.flip = True
  c.aug.jitter_p = 0.8
  c.aug.brightness = 0.4
  c.aug.contrast = 0.4
  c.aug.saturation = 0.0
  c.aug.hue = 0.0
  c.aug.grayscale_p = 0.0
  c.aug.blur_p = (0.0, 0.0)      # per view
  c.aug.solarize_p = (0.0, 0.0)  # per view

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # -1 = all remaining devices
  c.mesh.fsdp = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 400       # periodic kNN on a subset; the final one uses the full splits
  c.eval.at_start = True
  c.eval.full_at_start = False
  c.eval.final_full = True
  c.eval.bank_size = 10000       # periodic: this many train images as the bank ...
  c.eval.query_size = 2000       # ... and this many test images as queries
  c.eval.batch_size = 1000
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07

  if arg == "smoke":
    c.total_steps = 24
    c.batch_size = 64
    c.log_every_steps = 4
    c.model.width = 64
    c.model.depth = 2
    c.model.num_heads = 2
    c.mocov3.proj_hidden_dim = 256
    c.mocov3.pred_hidden_dim = 256
    c.mocov3.out_dim = 64
    c.checkpoint.every_steps = 10
    c.eval.every_steps = 0
    c.eval.at_start = False
    c.eval.bank_size = 2000
    c.eval.query_size = 500
    c.eval.final_full = False     # subsets keep the smoke run fast
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; available: smoke")
  return c
