"""What every recipe shares: the full key set but the objective, at the embedded Fashion-MNIST
defaults (configs/fmnist_mocov3.py's values).

Not a recipe itself: each recipe (configs/fmnist_*.py, configs/imagenet_common.py for the ImageNet
ones) starts from `get_config()`, sets `objective` and adds that objective's section, and changes
what it needs. `apply_smoke(c)` holds the smoke overrides the fmnist recipes share.
"""
import ml_collections

from input_pipeline import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128             # global
  # Compute budget in base-forward units (1 = one forward of the uncompressed backbone on one
  # image); `budget` > 0 wins, else `budget_epochs` full-cost epochs (passes over the train split
  # with the uncompressed step). Compressed stages take more, cheaper steps for their share.
  c.budget = -1.0
  c.budget_epochs = 0.85
  # Compression schedule: a preset ('dynamic', 'none' = the uncompressed baseline, 'token_drop',
  # 'patch_scale'; see vit_accel/step_plan.py), 'online' (decided during training from measured
  # CA-MSE, see `online` below), or stages 'END:SPEC; ...', e.g. '0.5:keep0.25|keep0.25; 1:full'.
  # END = budget fraction where the stage ends.
  c.schedule = "dynamic"
  c.schedule_file = ""  # a file holding a schedule (e.g. --mode=search's); wins over schedule
  c.allow_schedule_change = False   # True: resume a checkpoint under a different step plan
  # JAX persistent compilation cache; "" = JAX's own setting (off unless JAX_COMPILATION_CACHE_DIR).
  c.compile_cache_dir = "~/.cache/vit_accel/xla"
  # XLA CPU flags added to XLA_FLAGS before JAX starts (flags XLA_FLAGS already sets win; "" = none).
  # YNNPACK fusions off: on a 2-core AVX-512 CPU the embedded default's MoCo-v3 train step (batch
  # 256) ran 2270 -> 2010 ms without them, keep-25% 545 -> 537 ms (bench/cpu_peer.py measures it).
  # Only the CPU backend reads them.
  c.xla_cpu_flags = "--xla_cpu_experimental_ynn_fusion_type="
  c.stop_at_step = -1            # > 0: checkpoint and exit at this step (re-run to continue)
  c.log_every_steps = 20
  c.preemption_check_every_steps = 10   # multi-host: how often hosts agree on a SIGTERM
  c.tensorboard = True

  c.model = ml_collections.ConfigDict()
  c.model.image_size = 32
  c.model.patch_size = 4         # base patch size
  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.dtype = "float32"      # backbone compute; "bfloat16" on GPU/TPU (params stay float32)
  # Attention implementation: 'auto' = cuDNN's fused attention on a GPU with a 16-bit dtype (head dim
  # a multiple of 8, <= 128), 'heads_major' on a CPU (XLA's, with q/k/v laid out [B, N, T, H] first:
  # faster there), jax.nn.dot_product_attention's XLA path otherwise; or force 'xla' / 'cudnn' /
  # 'heads_major'. All compute the same function.
  c.model.attention = "auto"
  c.model.attention_pad_to = 0   # > 1: pad the sequence to a multiple of this (masked; same result)
  # Rematerialisation for large batches: 'block' recomputes each encoder block in the backward pass,
  # 'dots' keeps only the dense layers' outputs; same gradients, less activation memory, more compute.
  c.model.remat = "none"

  # Sequence compression (vit_accel/compression.py). A strategy spec is 'full', 'keep0.25' (random
  # token keep), 'count16', 'patch8' (flexible patch size), 'patch8,keep0.5', 'res16' (resolution
  # scaling); 'QUERY|KEY' sets both branches, a single spec compresses the query only; multi-crop
  # recipes (DINO) may add the local crops' own: 'QUERY|KEY|LOCAL'.
  c.compression = ml_collections.ConfigDict()
  c.compression.bucket = 8       # kept-token counts round to a multiple of this
  # --mode=cost times the train step for each of these (full length is always measured first).
  c.compression.cost_candidates = (
      "keep0.5", "keep0.25", "patch8", "keep0.5|keep0.5", "keep0.25|keep0.25",
      "patch8|patch8", "res16|res16")
  c.compression.cost_repeats = 7
  # True: a compressed stage's EMA momentum per step is m ** (step cost / full step cost), so the
  # momentum encoder (MoCo-v3's key, DINO's teacher) averages over the same share of the budget at
  # every stage; False: the same per-step momentum whatever the step costs (MoCo-v3's, DINO's own).
  # Resume-free like the schedule (the whole compression section): a resumed run may change it.
  c.compression.ema_per_budget = False

  # --mode=grad_error (vit_accel/grad_error.py): gradient bias / variance / CA-MSE per strategy at
  # saved checkpoints; R reference batches for g*, then M batches per strategy (global batch_size).
  c.grad_error = ml_collections.ConfigDict()
  c.grad_error.steps = ()        # checkpoint steps to analyse; () = the milestones, else every saved one
  c.grad_error.reference_batches = 8
  c.grad_error.batches = 6
  c.grad_error.candidates = ("keep0.5|keep0.5", "keep0.25|keep0.25", "patch8|patch8", "keep0.5",
                             "keep0.25")
  # Intervals and sample size: Efron's bootstrap over batches gives every term a ci_level interval;
  # a table is measured again on fresh batches (pooled) until the lowest CA-MSE is clear of the
  # others or its interval is narrower than ci_target x its value, at most max_rounds times.
  c.grad_error.bootstrap = 400
  c.grad_error.ci_level = 0.9
  c.grad_error.ci_target = 0.2
  c.grad_error.max_rounds = 3
  # Step cost relative to full length in CA-MSE: --mode=cost's measured times from this table
  # ("" = WORKDIR/cost_table.json when there; "none" = the analytic cost model).
  c.grad_error.cost_table = ""
  # The space the errors are measured in: "euclidean" (the raw gradient, the paper's) or "adam"
  # (each coordinate divided by AdamW's sqrt(nu_hat) + eps at the checkpoint: the update's space).
  c.grad_error.metric = "euclidean"
  # --mode=search (vit_accel/schedule_search.py): lowest CA-MSE per budget interval ->
  # WORKDIR/schedule.txt.
  c.search = ml_collections.ConfigDict()
  # Ties -> the cheaper: 'interval' = CA-MSE intervals overlapping the lowest one's (tables
  # without intervals fall back to 'tolerance': within tie_tolerance of the lowest value).
  c.search.ties = "interval"
  c.search.tie_tolerance = 0.05
  # True: compression only relaxes along training (each stage's step costs at least the last's).
  c.search.monotone = False
  # A prior schedule (preset or 'END:SPEC; ...'; '' = none): in each interval its stages stand
  # unless a candidate's CA-MSE is below it with confidence, on enough batches to say so (5-9, see
  # schedule_search.batches_to_displace; then those compete as above). Without one, every
  # interval whose measurements cannot separate the candidates goes to the cheapest. Also the
  # online schedule's. Recipes set their own hand-set schedule.
  c.search.prior = "dynamic"
  c.search.grad_error_file = ""  # "" = WORKDIR/grad_error.json
  # The last interval at full length whatever it measured (evaluation is at full length; CA-MSE
  # only scores gradients at the compressed length).
  c.search.final_full = True
  # schedule="online" (vit_accel/online.py): every `every` of the budget, measure CA-MSE of full
  # length and these candidates at the current parameters (R + M batches, charged to the budget)
  # and run the best until the next decision.
  c.online = ml_collections.ConfigDict()
  c.online.every = 0.2
  # 6 + 6 batches: the fewest on which one of 3 candidates may displace search.prior's strategy
  # at grad_error.ci_level 0.9 (schedule_search.batches_to_displace).
  c.online.reference_batches = 6
  c.online.batches = 6
  c.online.candidates = ("patch8|patch8", "keep0.5|keep0.5", "keep0.25|keep0.25")
  # The measurements' cap, as a share of the budget. A round costs the same at any budget: the
  # default 4 rounds cost ~10% of a 1-epoch MoCo-v3 budget, ~2.6% of a 4-epoch one. Above the cap
  # the online schedule measures nothing and runs search.prior's strategies.
  c.online.measure_fraction = 0.05
  # Ties -> the cheaper, as search.ties.
  c.online.ties = "interval"
  # --mode=pilot: a short uncompressed run (this share of the budget) with milestones at these
  # fractions of its own budget, then grad_error and search on it, all in WORKDIR.
  c.pilot = ml_collections.ConfigDict()
  c.pilot.budget_fraction = 0.15
  c.pilot.at_progress = (0.1, 0.35, 0.6, 0.9)
  # The gradient-error measurements' cap, as a share of the budget: a round costs the same at any
  # budget, so at small budgets grad_error's R and M shrink (to 2 each at least) and fewer rounds
  # run, so that the pilot costs at most budget_fraction + measure_fraction.
  c.pilot.measure_fraction = 0.1
  # True: the searched run starts from the pilot's final weights (init.workdir = WORKDIR/pilot, see
  # `init`), so the pilot's training is not thrown away; its lr schedule and optimiser restart.
  # --mode=pilot says so in schedule.txt and pilot_cost.json ("init_workdir").
  c.pilot.warm_start = False
  # What the pilot trains under: "none" (uncompressed, the paper's pilot) or "prior" (search.prior,
  # compressed in time like its lr schedule: the milestones' weights are then those the run would
  # have at that progress, and each pilot step costs what the prior's does).
  c.pilot.train_schedule = "none"

  # A fresh run's starting weights: the trained network, the EMA copy and the objective's state
  # (DINO's centre) of checkpoint `checkpoint_step` (-1 = the latest) in init.workdir's run; step,
  # optimiser state and every schedule start afresh. "" = random initialisation. The source's
  # optimiser state is not read (it may differ, e.g. in clipping). Part of the run's identity: a
  # resume must name the same source, which it never reads (it may be gone by then).
  c.init = ml_collections.ConfigDict()
  c.init.workdir = ""
  c.init.checkpoint_step = -1

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 2e-3         # x batch_size / 256 (MoCo-v3 ViT: 1.5e-4 at batch 4096)
  c.optim.warmup_fraction = 0.1
  c.optim.lr_end_factor = 0.0
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.grad_clip = 0.0
  # After warm-up the lr decays to lr_end_factor x peak: 'cosine', or 'polynomial':
  # end + (peak - end) x (1 - t) ** decay_power (Lin et al. 2024 compare cosine with power 2).
  c.optim.decay = "cosine"
  c.optim.decay_power = 2.0      # 'polynomial' only

  c.data = ml_collections.ConfigDict()
  # Sources (input_pipeline/sources.py): 'fashion_mnist' (embedded), 'image_folder' (data.dir =
  # ROOT holding train/<class>/* and test/<class>/*, any common format, grey or colour) or 'tfds'
  # (data.tfds_name prepared in data.dir; nothing is ever downloaded).
  c.data.source = "fashion_mnist"
  c.data.dir = ""                # "" = the Debian package's /usr/share/datasets/fashion-mnist
  c.data.tfds_name = ""          # e.g. "imagenet2012", "cifar10"
  c.data.tfds_splits = ml_collections.ConfigDict({"train": "train", "test": "test"})
  c.data.num_examples = ml_collections.ConfigDict({"train": -1, "test": -1})  # -1: from metadata
  c.data.shuffle_buffer = 10_000  # TFDS streams only (indexable sources shuffle exactly)
  c.data.verify_images = True    # image_folder: decode every file once at start
  c.data.bad_images = "skip"     # ... unreadable ones: 'skip' (left out and counted) or 'fail'
  c.data.mean = (0.286, 0.286, 0.286)   # Fashion-MNIST pixel statistics after padding
  c.data.std = (0.353, 0.353, 0.353)
  c.data.prefetch = 4
  # Where the training views are made: 'host' (tf.data) or 'device' (JAX, on the accelerator; on
  # a file source the host still decodes each image's crop window): input_pipeline/streams.py.
  c.data.augment_on = "host"
  # augment_on='device', file sources: side (px) of the fixed-size window each image's crops are
  # sent in; a window larger than this is shrunk to fit on the host (views.make_windows).
  c.data.window_size = 512

  # Two-view recipe for grey images: the augmentation keys and their meaning are recipes.defaults'
  # (one home); the colour ops (saturation, hue, greyscale, blur, solarise) are off here.
  c.aug = recipes.defaults()
  c.aug.crop_scale = (0.2, 1.0)
  c.aug.saturation = 0.0
  c.aug.hue = 0.0
  c.aug.grayscale_p = 0.0
  c.aug.blur_sigma = (0.1, 2.0)  # px (unused while blur_p is 0)

  # Multi-process runs (vit_accel/distributed.py): one process per host, same command on each.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"      # 'auto' | 'always' (TPU pods, Slurm, Open MPI) | 'never'
  c.distributed.coordinator_address = ""  # "host:port" of process 0 (else $JAX_COORDINATOR_ADDRESS)
  c.distributed.num_processes = -1       # (else $JAX_NUM_PROCESSES)
  c.distributed.process_id = -1          # (else $JAX_PROCESS_ID)
  c.distributed.timeout_s = 300

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # -1 = all remaining devices
  c.mesh.fsdp = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  # Also keep checkpoints at these budget fractions in WORKDIR/milestones (never deleted): what
  # --mode=grad_error measures, early to late.
  c.checkpoint.at_progress = (0.1, 0.4, 0.7, 0.95)

  c.eval = ml_collections.ConfigDict()
  # kNN and linear probe: bank / probe-train = train split, queries / probe-test = test split.
  # Periodic evaluations use fixed random subsets (cheap); the initial network (the baseline) and
  # the final one use the final sizes, -1 = the whole split. Evaluation stays under ~10% of the run
  # on 2 CPU cores.
  c.eval.every_steps = 600
  c.eval.at_progress = ()        # also evaluate at these budget fractions, e.g. (0.1, 0.2, 0.5)
  c.eval.bank_size = 2000
  c.eval.query_size = 1000
  c.eval.at_start = True
  c.eval.final_bank_size = 10000
  c.eval.final_query_size = 5000
  c.eval.batch_size = 1000
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07
  # Linear probe on the same features (bank -> queries), see evaluation.py: 'ridge' (closed form)
  # or 'logistic' (softmax regression by L-BFGS: a few seconds more; higher than
  # ridge on every feature set tried so far).
  c.eval.linear = "ridge"
  c.eval.checkpoint_step = -1    # --mode=eval: which checkpoint (-1 = the latest)
  # Which weights: "" = the objective's (the trained network; DINO: its EMA teacher), "online"
  # (the trained network, e.g. DINO's student) or "ema" (the EMA copy: MoCo's key encoder).
  c.eval.weights = ""

  # --mode=export (vit_accel/export.py): the backbone of a checkpoint (the weights eval.weights
  # selects) as timm safetensors + config.json + Flax msgpack in DIR/step_<N>/.
  c.export = ml_collections.ConfigDict()
  c.export.checkpoint_step = -1  # which checkpoint (-1 = the latest)
  c.export.dir = ""              # "" = WORKDIR/export
  c.export.patch_size = 0        # 0 = the base patch; else the kernel PI-resized to this patch

  # --mode=finetune (vit_accel/finetune.py): backbone + linear head trained end to end on the
  # labelled train split (MAE / BEiT / DeiT fine-tuning recipe), test top-1 on the whole test
  # split. 468 steps, about 5 minutes on 2 CPU cores at these values (README).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.init = "checkpoint"  # 'checkpoint' (the run in WORKDIR) or 'random' (the baseline)
  c.finetune.checkpoint_step = -1  # which checkpoint (-1 = the latest)
  c.finetune.epochs = 1.0         # passes over the train split (a fraction allowed)
  c.finetune.batch_size = 128     # global
  c.finetune.base_lr = 2e-3       # peak AdamW lr per 256 images (x batch_size / 256)
  c.finetune.warmup_fraction = 0.1  # of the fine-tuning steps; then cosine to 0
  c.finetune.weight_decay = 0.05
  c.finetune.layer_decay = 0.75   # lr x this^(depth - i) for block i, ^(depth + 1) for embeddings
  c.finetune.label_smoothing = 0.1
  c.finetune.crop_scale = (0.5, 1.0)   # random resized crop area; plus a horizontal flip
  c.finetune.flip = True
  c.finetune.eval_every_epochs = 1.0   # test top-1 this often too (0 = only at the end)
  return c


def is_smoke(arg: str | None) -> bool:
  """The fmnist recipes' argument: None (the recipe) or 'smoke'; anything else is one error."""
  if arg and arg != "smoke":
    raise ValueError(f"unknown config argument {arg!r}; available: smoke")
  return arg == "smoke"


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """The shared smoke overrides (< 1 min on CPU); recipes add their objective's (smaller heads)."""
  c.budget_epochs = 0.01
  c.schedule = "0.6:keep0.25|keep0.25; 1:full"   # two stages: two compiled steps
  c.batch_size = 64
  c.log_every_steps = 4
  c.model.width = 64
  c.model.depth = 2
  c.model.num_heads = 2
  c.checkpoint.every_steps = 10
  c.checkpoint.at_progress = ()
  c.eval.every_steps = 0
  c.eval.at_start = False
  c.eval.bank_size = 1000
  c.eval.query_size = 500
  c.eval.final_bank_size = 2000
  c.eval.final_query_size = 500
  c.eval.batch_size = 500
  c.finetune.epochs = 0.05       # 47 steps at batch 64
  c.finetune.batch_size = 64
  c.finetune.base_lr = 1e-2      # a few dozen steps: the default's would barely move the head
  c.finetune.eval_every_epochs = 0.0
