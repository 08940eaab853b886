"""What every config value may be: one declarative table, checked before anything compiles.

`check(config)` walks the config and raises `UserError` for the first value outside its domain, as
one line naming the key, the value and the allowed range, e.g.

  mocov3.temperature=0 is out of range: must be a number > 0

Keys a config does not have (another objective's section) are skipped.
Every key of every shipped recipe must have an entry here (tests/test_config_domains.py checks it),
so a key added later cannot go unchecked. Cross-key rules (patch size tiles the image, batch divides
the devices, schedule strings parse) live in config_checks.validate_config.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from vit_accel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Number:
  """A real (or integer) in [low, high], ends open when asked; `also`: extra allowed sentinels
  (e.g. -1 = "automatic")."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  also: tuple = ()

  def ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if v in self.also:
      return True
    if not math.isfinite(v) or (self.integer and v != int(v)):
      return False
    above = v > self.low if self.low_open else v >= self.low
    below = v < self.high if self.high_open else v <= self.high
    return above and below

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    lo = "" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {self.low:g}"
    hi = "" if self.high == math.inf else f"{'<' if self.high_open else '<='} {self.high:g}"
    if lo and hi:
      left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
      rng = f"in {left}{self.low:g}, {self.high:g}{right}"
    else:
      rng = lo or hi
    text = f"{kind} {rng}".strip()
    if self.also:
      text += " or " + " or ".join(f"{a:g}" for a in self.also)
    return text


@dataclasses.dataclass(frozen=True)
class Choice:
  values: tuple

  def ok(self, v) -> bool:
    return v in self.values

  def describe(self) -> str:
    return "one of " + ", ".join(repr(v) for v in self.values)


@dataclasses.dataclass(frozen=True)
class Flag:
  def ok(self, v) -> bool:
    return isinstance(v, bool)

  def describe(self) -> str:
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Text:
  """Any string; what it means is checked where it is parsed (schedules, paths, strategy specs)."""

  def ok(self, v) -> bool:
    return isinstance(v, str)

  def describe(self) -> str:
    return "a string"


@dataclasses.dataclass(frozen=True)
class Each:
  """A tuple whose every element is in `item`; `length` fixes its length, `ordered` requires
  non-decreasing elements (a (low, high) range)."""
  item: Any
  length: int | None = None
  ordered: bool = False

  def ok(self, v) -> bool:
    if not isinstance(v, (tuple, list)) or (self.length is not None and len(v) != self.length):
      return False
    if not all(self.item.ok(x) for x in v):
      return False
    return not self.ordered or all(a <= b for a, b in zip(v, v[1:]))

  def describe(self) -> str:
    what = f"{self.length} values" if self.length is not None else "a tuple of values"
    order = ", low <= high" if self.ordered else ""
    return f"{what}{order}, each {self.item.describe()}"


@dataclasses.dataclass(frozen=True)
class Optional:
  """`None` or a value in `inner`."""
  inner: Any

  def ok(self, v) -> bool:
    return v is None or self.inner.ok(v)

  def describe(self) -> str:
    return f"None or {self.inner.describe()}"


POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)
PROBABILITY = Number(0, 1)
FRACTION = Number(0, 1, low_open=True)        # a share of the budget: (0, 1]
COUNT = Number(1, integer=True)               # >= 1
NON_NEGATIVE_INT = Number(0, integer=True)
AUTO_OR_COUNT = Number(1, integer=True, also=(-1,))
ANY_INT = Number(integer=True)
ANY_NUMBER = Number()
BETA = Number(0, 1, high_open=True)
RANGE_01 = Each(FRACTION, 2, ordered=True)     # crop scales: (low, high) in (0, 1]
TEXT, FLAG = Text(), Flag()

# key -> domain. Keys of every section, for every objective; a recipe need not have them all.
DOMAINS = {
    # run
    "objective": TEXT,                    # checked against the objective registry
    "seed": NON_NEGATIVE_INT,
    "batch_size": COUNT,
    "budget": ANY_NUMBER,                 # > 0 wins; <= 0 = use budget_epochs
    "budget_epochs": ANY_NUMBER,          # at least one of the two > 0 (validate_config)
    "schedule": TEXT,
    "schedule_file": TEXT,
    "allow_schedule_change": FLAG,
    "compile_cache_dir": TEXT,
    "xla_cpu_flags": TEXT,
    "stop_at_step": ANY_INT,              # <= 0 = run to the end
    "log_every_steps": COUNT,
    "preemption_check_every_steps": COUNT,
    "tensorboard": FLAG,
    # model
    "model.image_size": COUNT,
    "model.patch_size": COUNT,
    "model.width": COUNT,
    "model.depth": COUNT,
    "model.num_heads": COUNT,
    "model.mlp_ratio": POSITIVE,
    "model.dtype": Choice(("float32", "bfloat16")),
    "model.attention": Choice(("auto", "xla", "cudnn", "heads_major")),
    "model.attention_pad_to": NON_NEGATIVE_INT,
    "model.remat": Choice(("none", "block", "dots")),
    # objectives
    "mocov3.temperature": POSITIVE,
    "mocov3.base_momentum": PROBABILITY,
    "mocov3.symmetric": FLAG,
    "mocov3.proj_hidden_dim": COUNT,
    "mocov3.pred_hidden_dim": COUNT,
    "mocov3.out_dim": COUNT,
    "simclr.temperature": POSITIVE,
    "simclr.proj_hidden_dim": COUNT,
    "simclr.out_dim": COUNT,
    "simclr.proj_layers": COUNT,
    "dino.out_dim": COUNT,
    "dino.hidden_dim": COUNT,
    "dino.bottleneck_dim": COUNT,
    "dino.head_layers": COUNT,
    "dino.norm_last_layer": FLAG,
    "dino.head_bn": FLAG,
    "dino.head_batch": Choice(("per_view", "all_views")),
    "dino.student_temp": POSITIVE,
    "dino.teacher_temp": POSITIVE,
    "dino.warmup_teacher_temp": POSITIVE,
    "dino.warmup_teacher_temp_fraction": PROBABILITY,
    "dino.center_momentum": PROBABILITY,
    "dino.centering": Choice(("ema", "sinkhorn")),
    "dino.koleo_weight": NON_NEGATIVE,
    "dino.base_momentum": PROBABILITY,
    "dino.final_momentum": PROBABILITY,
    "dino.freeze_last_layer_fraction": PROBABILITY,
    # compression and the schedule's measurements
    "compression.bucket": COUNT,
    "compression.cost_candidates": Each(TEXT),
    "compression.cost_repeats": COUNT,
    "compression.ema_per_budget": FLAG,
    "grad_error.steps": Each(NON_NEGATIVE_INT),
    "grad_error.reference_batches": Number(2, integer=True),
    "grad_error.batches": Number(2, integer=True),
    "grad_error.candidates": Each(TEXT),
    "grad_error.bootstrap": COUNT,
    "grad_error.ci_level": Number(0, 1, low_open=True, high_open=True),
    "grad_error.ci_target": NON_NEGATIVE,
    "grad_error.max_rounds": COUNT,
    "grad_error.cost_table": TEXT,
    "grad_error.metric": Choice(("euclidean", "adam")),
    "search.tie_tolerance": NON_NEGATIVE,
    "search.grad_error_file": TEXT,
    "search.final_full": FLAG,
    "search.ties": Choice(("interval", "tolerance")),
    "search.monotone": FLAG,
    "search.prior": TEXT,
    "online.every": FRACTION,
    "online.reference_batches": Number(2, integer=True),
    "online.batches": Number(2, integer=True),
    "online.candidates": Each(TEXT),
    "online.ties": Choice(("interval", "tolerance")),
    "online.measure_fraction": FRACTION,
    "pilot.budget_fraction": FRACTION,
    "pilot.measure_fraction": FRACTION,
    "pilot.at_progress": Each(FRACTION),
    "pilot.warm_start": FLAG,
    "pilot.train_schedule": Choice(("none", "prior")),
    # optimiser
    "optim.base_lr": POSITIVE,
    "optim.warmup_fraction": PROBABILITY,
    "optim.lr_end_factor": PROBABILITY,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.b1": BETA,
    "optim.b2": BETA,
    "optim.grad_clip": NON_NEGATIVE,      # 0 = off
    "optim.decay": Choice(("cosine", "polynomial")),
    "optim.decay_power": POSITIVE,
    # data
    "data.source": TEXT,                  # checked by input_pipeline.sources.check_source
    "data.dir": TEXT,
    "data.tfds_name": TEXT,
    "data.tfds_splits.train": TEXT,
    "data.tfds_splits.test": TEXT,
    "data.num_examples.train": AUTO_OR_COUNT,
    "data.num_examples.test": AUTO_OR_COUNT,
    "data.shuffle_buffer": COUNT,
    "data.verify_images": FLAG,
    "data.bad_images": Choice(("skip", "fail")),
    "data.mean": Each(ANY_NUMBER, 3),
    "data.std": Each(POSITIVE, 3),
    "data.prefetch": Number(0, integer=True, also=(-1,)),   # -1 = tf.data AUTOTUNE
    "data.augment_on": Choice(("host", "device")),           # input_pipeline/streams.py
    "data.window_size": Number(16, integer=True),           # input_pipeline/views.make_windows
    # augmentation
    "aug.crop_scale": RANGE_01,
    "aug.crop_ratio": Each(POSITIVE, 2, ordered=True),
    "aug.flip": FLAG,
    "aug.downscale": Choice(("antialias", "area", "bilinear")),   # augment.resize_crop
    "aug.jitter_p": PROBABILITY,
    "aug.brightness": NON_NEGATIVE,
    "aug.contrast": NON_NEGATIVE,
    "aug.saturation": NON_NEGATIVE,
    "aug.hue": Number(0, 0.5),
    "aug.grayscale_p": PROBABILITY,
    "aug.blur_sigma": Each(POSITIVE, 2, ordered=True),
    "aug.blur_p": Each(PROBABILITY, 2),
    "aug.solarize_p": Each(PROBABILITY, 2),
    "aug.local_crops": NON_NEGATIVE_INT,
    "aug.local_size": NON_NEGATIVE_INT,   # > 0 with local crops (validate_config)
    "aug.local_crop_scale": RANGE_01,
    "aug.local_blur_p": PROBABILITY,
    # scale-out
    "distributed.initialize": Choice(("auto", "always", "never")),
    "distributed.coordinator_address": TEXT,
    "distributed.num_processes": AUTO_OR_COUNT,
    "distributed.process_id": Number(0, integer=True, also=(-1,)),
    "distributed.timeout_s": POSITIVE,
    "mesh.data": AUTO_OR_COUNT,
    "mesh.fsdp": AUTO_OR_COUNT,
    # checkpoints
    "checkpoint.every_steps": COUNT,
    "checkpoint.keep": Optional(COUNT),   # None = keep every checkpoint
    "checkpoint.async_save": FLAG,
    "checkpoint.at_progress": Each(FRACTION),
    # evaluation
    "eval.every_steps": NON_NEGATIVE_INT,  # 0 = no periodic evaluation
    "eval.at_progress": Each(FRACTION),
    "eval.bank_size": COUNT,
    "eval.query_size": COUNT,
    "eval.at_start": FLAG,
    "eval.final_bank_size": AUTO_OR_COUNT,
    "eval.final_query_size": AUTO_OR_COUNT,
    "eval.batch_size": COUNT,
    "eval.knn_k": COUNT,
    "eval.knn_temperature": POSITIVE,
    "eval.checkpoint_step": Number(0, integer=True, also=(-1,)),
    "eval.weights": Choice(("", "online", "ema")),
    "eval.linear": Choice(("ridge", "logistic")),
    # export
    "export.checkpoint_step": Number(0, integer=True, also=(-1,)),
    "init.workdir": TEXT,
    "init.checkpoint_step": Number(0, integer=True, also=(-1,)),
    "export.dir": TEXT,
    "export.patch_size": NON_NEGATIVE_INT,   # 0 = base; else must tile the image (the driver)
    # fine-tune (--mode=finetune; batch vs devices and train split: finetune.make_plan)
    "finetune.init": Choice(("checkpoint", "random")),
    "finetune.checkpoint_step": Number(0, integer=True, also=(-1,)),
    "finetune.epochs": POSITIVE,
    "finetune.batch_size": COUNT,
    "finetune.base_lr": POSITIVE,
    "finetune.warmup_fraction": PROBABILITY,
    "finetune.weight_decay": NON_NEGATIVE,
    "finetune.layer_decay": FRACTION,         # (0, 1]; 1 = no layer-wise decay
    "finetune.label_smoothing": BETA,         # [0, 1); 1 would make every target uniform
    "finetune.crop_scale": RANGE_01,
    "finetune.flip": FLAG,
    "finetune.eval_every_epochs": NON_NEGATIVE,   # 0 = only at the end
}


def flatten(tree, prefix: str = "") -> dict:
  """{dotted key: leaf} of a ConfigDict or nested dict. Tuples and lists are leaves, except lists
  of dicts (a step plan's stages), whose items are indexed: 'stages.0.spec'."""
  if hasattr(tree, "items"):
    items = tree.items()
  elif isinstance(tree, (list, tuple)) and any(hasattr(x, "items") for x in tree):
    items = enumerate(tree)
  else:
    return {prefix[:-1]: tree}
  out = {}
  for key, value in items:
    out.update(flatten(value, f"{prefix}{key}."))
  return out


def _show(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def check(config) -> None:
  """Raises UserError (one line: key, value, allowed range) for the first value outside its domain.

  Args: config: a ConfigDict (or nested dict) of a recipe. Keys without an entry in DOMAINS are not
  checked here (the coverage test keeps the shipped recipes fully covered).
  """
  for key, value in flatten(config).items():
    domain = DOMAINS.get(key)
    if domain is None:
      continue
    if isinstance(value, list):
      value = tuple(value)
    if not domain.ok(value):
      raise UserError(f"{key}={_show(value)} is out of range: must be {domain.describe()}")
