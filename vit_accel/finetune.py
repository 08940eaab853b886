"""End-to-end fine-tuning of the backbone plus a linear head on the labelled train split, scored by
top-1 on the test split (--mode=finetune; the driver is vit_accel/modes/finetune.py).

The standard recipe of MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
appendix A.1), BEiT (Bao et al., ICLR 2022, section 2.5 / appendix) and DeiT (Touvron et al., ICML
2021), scaled to the embedded 32 px data:

  - the backbone: the pretrained one the objective evaluates (restored by the driver), or a fresh one
    from the config's seed (the baseline; it equals the pretraining run's step-0 backbone, since
    flax derives a submodule's init key from its path, `backbone` in both); the objective's heads
    are dropped; a new linear head on the final-LayerNorm CLS feature, zero-initialised (MAE's
    head starts at std 2e-5, effectively zero);
  - AdamW (optax.adamw; betas 0.9 / 0.999 as MAE and BEiT fine-tuning), peak lr
    finetune.base_lr x batch / 256, linear warm-up over finetune.warmup_fraction of the steps, then
    cosine decay to 0 (on fine-tuning progress, not the pretraining budget);
  - layer-wise learning-rate decay (BEiT; ELECTRA before it): the head and final norm get the lr,
    block i (0-based) lr x decay^(depth - i), patch embedding, position embedding and CLS token
    lr x decay^(depth + 1); applied as a per-parameter multiplier on AdamW's update, which is
    exactly per-group AdamW with those lrs (the weight decay step scales with its group's lr too);
  - weight decay on matrices only: not on biases, norms, position embedding or CLS token (the rule
    of vit_accel/optimizer.py);
  - label smoothing (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016): targets
    (1 - s) one-hot + s / K, as timm's LabelSmoothingCrossEntropy;
  - light augmentation: random resized crop (area finetune.crop_scale, aspect 3/4..4/3) and
    horizontal flip, from input_pipeline.augment; no mixup, cutmix, RandAugment or drop path (the
    backbone has none), which a 4-block ViT on a few epochs of 32 px grey images does not need;
  - full-length tokens (no compression), the model's compute dtype (model.dtype), float32
    parameters, optimiser state and logits.

No checkpoints: a fine-tune is minutes long on the embedded data; re-run it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from input_pipeline.tf_runtime import tf

from input_pipeline import augment, pipeline, sources, tf_runtime, views
from vit_accel import evaluation, optimizer, rng_streams, state
from vit_accel import sharding as sharding_lib
from vit_accel.errors import UserError
from vit_accel.train_step import normalize_images

CROP_RATIO = (3 / 4, 4 / 3)   # torchvision's RandomResizedCrop default, as DeiT / MAE fine-tuning
BETAS = (0.9, 0.999)          # MAE / BEiT fine-tuning


class Classifier(nn.Module):
  """Backbone + linear head. `__call__(images) -> logits`: images float [B, S, S, 3] (normalised),
  logits float32 [B, num_classes]. Parameters: {'backbone': the ViT's, 'head': {kernel, bias}}."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images):
    cls, _ = self.backbone(images)   # full length: the default strategy keeps every token
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                    name="head")(cls.astype(jnp.float32))


def build_classifier(config, num_classes: int) -> Classifier:
  """The config's backbone (state.build_model's, so any backbone setting applies) + a linear head."""
  return Classifier(backbone=state.build_model(config).backbone, num_classes=num_classes)


def layer_decay_multipliers(params, depth: int, decay: float):
  """Layer-wise lr decay (BEiT, Bao et al. 2022; MAE's `param_groups_lrd`): a tree shaped like
  `params` ({'backbone': ..., 'head': ...} of a Classifier) holding each leaf's lr multiplier, a
  Python float: decay^(depth + 1 - layer), layer 0 = patch embedding, position embedding and CLS
  token, layer i + 1 = block i, layer depth + 1 = final norm and head. Raises ValueError for a
  parameter it cannot place (a backbone change this table does not know)."""
  def layer(path) -> int:
    if path[0] == "head":
      return depth + 1
    name = path[1] if path[0] == "backbone" and len(path) > 1 else ""
    if name in ("patch_embed", "pos_embed", "cls_token"):
      return 0
    if name.startswith("block") and name[5:].isdigit() and int(name[5:]) < depth:
      return int(name[5:]) + 1
    if name == "norm":
      return depth + 1
    raise ValueError(f"no layer-wise lr decay rule for parameter {'/'.join(path)}")

  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: float(decay) ** (depth + 1 - layer(path)) for path in flat})


def learning_rate_at(config, step, total_steps: int):
  """Fine-tuning lr at `step` (0-based, int or int array) of `total_steps`: linear warm-up from 0 to
  the peak over finetune.warmup_fraction of the steps, then cosine decay to 0 (MAE's
  `adjust_learning_rate`, per step). Peak = finetune.base_lr x finetune.batch_size / 256 (linear
  scaling, Goyal et al. 2017). float32 scalar."""
  ft = config.finetune
  peak = ft.base_lr * ft.batch_size / 256.0
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  warmup = ft.warmup_fraction
  warm = peak * progress / max(warmup, 1e-12)
  t = jnp.clip((progress - warmup) / max(1.0 - warmup, 1e-12), 0.0, 1.0)
  return jnp.where(progress < warmup, warm, peak * 0.5 * (1.0 + jnp.cos(math.pi * t)))


def make_optimizer(config, params, total_steps: int) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019; optax.adamw) with the warm-up + cosine lr of
  learning_rate_at, finetune.weight_decay on optimizer.decay_mask's parameters, and each update
  scaled by its layer_decay_multipliers (finetune.layer_decay over model.depth). `params`: a Classifier's
  parameters (or their shapes)."""
  ft = config.finetune
  multipliers = layer_decay_multipliers(params, config.model.depth, ft.layer_decay)
  adamw = optax.adamw(lambda count: learning_rate_at(config, count, total_steps), b1=BETAS[0],
                      b2=BETAS[1], weight_decay=ft.weight_decay, mask=optimizer.decay_mask)
  # AdamW's whole step (Adam direction + decay) is linear in the lr: scaling it is per-group lr.
  layer_scale = optax.stateless(
      lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, multipliers))
  return optax.chain(adamw, layer_scale)


def smoothed_cross_entropy(logits, labels, smoothing: float):
  """Mean cross-entropy of `logits` (float [B, K]) against integer `labels` ([B], in [0, K)) with
  label smoothing `smoothing` in [0, 1): targets (1 - s) one-hot + s / K (optax.smooth_labels, then
  optax.softmax_cross_entropy; Szegedy et al. 2016). float32 scalar, nats."""
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


# ------------------------------------------------------------------------------------------ data
def num_classes(source) -> int:
  """Classes of a train source: image folders' class folders, TFDS's label feature, else the
  largest label + 1."""
  if isinstance(source, sources.ImageFiles):
    return len(source.class_names)
  if isinstance(source, sources.TfdsSplit):
    builder = _tfds_builder(source)
    return int(builder.info.features[builder.info.supervised_keys[1]].num_classes)
  return int(np.max(source.labels)) + 1


def _tfds_builder(source: sources.TfdsSplit):
  tf_runtime.load()   # TF configured (accelerators hidden) before TFDS imports it
  import tensorflow_datasets as tfds  # lazy: heavy, and only the TFDS source needs it
  return tfds.builder(source.name, data_dir=source.data_dir)


def augment_example(image, seed, size: int, crop_scale, flip: bool):
  """Fine-tuning view of one float image [H, W, C] in [0, 1] (seed: int [2]): random resized crop
  to size x size (area in crop_scale, aspect CROP_RATIO), horizontal flip when `flip`; uint8
  [size, size, 3]."""
  s = tf.unstack(augment.split_seed(seed, 2))
  x = augment.random_resized_crop(image, s[0], size, scale=tuple(crop_scale), ratio=CROP_RATIO)
  if flip:
    x = augment.random_flip(x, s[1])
  return views.to_rgb_uint8(x)


def train_dataset(source, config, shard: pipeline.HostShard):
  """Endless tf.data stream of this host's local batches (uint8 images [b, S, S, 3], int32 labels
  [b]), b = finetune.batch_size / processes, S = model.image_size. Indexable sources (in memory,
  image folders): each host its contiguous shard, a fresh permutation per epoch, views seeded by
  (seed, position, host), like the pretraining stream (input_pipeline/pipeline.py) but its own
  draws (rng_streams.FINETUNE_DATA). TFDS: streamed per host (tfds.even_splits), shuffled with a
  seeded buffer."""
  source = sources.as_source(source)
  ft = config.finetune
  seed, host, size = int(config.seed), shard.process_index, int(config.model.image_size)

  def fold(values, salt):
    return tf.random.experimental.stateless_fold_in(tf.stack(values), salt)

  if isinstance(source, sources.TfdsSplit):
    ds = _tfds_examples(source, config, shard)
  else:
    start, end = shard.shard_bounds(source.num_examples)
    per_epoch = pipeline.steps_per_epoch(source.num_examples, shard) * shard.local_batch
    labels = tf.constant(source.labels[start:end].astype(np.int32))
    if isinstance(source, sources.ImageFiles):
      paths = tf.constant(source.paths[start:end])
      def load(i):
        return tf.cast(pipeline.decode_image_file(tf.gather(paths, i)), tf.float32) / 255.0
    else:
      images = tf.constant(source.images[start:end])
      def load(i):
        return tf.cast(tf.gather(images, i), tf.float32) / 255.0

    def epoch_examples(epoch):
      order_seed = fold([tf.constant(seed, tf.int64),
                         epoch * rng_streams.EPOCH_HOST_STRIDE + host], rng_streams.FINETUNE_DATA)
      perm = tf.argsort(tf.random.stateless_uniform([end - start], seed=order_seed))
      positions = epoch * per_epoch + tf.range(per_epoch, dtype=tf.int64)
      return tf.data.Dataset.from_tensor_slices((positions, perm[:per_epoch]))

    ds = tf.data.Dataset.range(2**40).flat_map(epoch_examples)
    ds = ds.map(lambda position, i: (position, load(i), tf.gather(labels, i)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def view(position, image, label):
    # The pretraining view seed of this (position, host), folded once more: other draws.
    view_seed = tf.random.experimental.stateless_fold_in(
        fold([tf.constant(seed, tf.int64), position], host), rng_streams.FINETUNE_DATA)
    return augment_example(image, view_seed, size, ft.crop_scale, ft.flip), label

  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(shard.local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options).prefetch(int(config.data.prefetch))


def _tfds_examples(source: sources.TfdsSplit, config, shard: pipeline.HostShard):
  """(position, float image, int32 label) of this host's TFDS part, repeated and shuffled."""
  tf_runtime.load()
  import tensorflow_datasets as tfds
  builder = _tfds_builder(source)
  host_split = tfds.even_splits(source.split, n=shard.process_count,
                                drop_remainder=True)[shard.process_index]
  shuffle_seed = int(config.seed) * rng_streams.TFDS_SHUFFLE_STRIDE + rng_streams.FINETUNE_DATA
  ds = builder.as_dataset(split=host_split, shuffle_files=True, as_supervised=True,
                          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
  ds = ds.map(lambda image, label: (tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.repeat().shuffle(int(config.data.shuffle_buffer), seed=shuffle_seed).enumerate()
  return ds.map(lambda position, example: (position, example[0], example[1]))


# ------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass(frozen=True)
class Plan:
  """How long the fine-tune runs, in optimiser steps of finetune.batch_size images."""
  num_classes: int
  steps_per_epoch: int
  total_steps: int
  eval_every_steps: int   # 0 = only at the end


def make_plan(config, train_source, mesh) -> Plan:
  """The fine-tune's length from finetune.epochs / batch_size / eval_every_epochs and the train
  split. Raises UserError (one line naming the key) when the batch does not divide the devices or
  exceeds the split, the run is shorter than one step, or the split has fewer than 2 classes."""
  ft = config.finetune
  sharding_lib.check_batch(ft.batch_size, mesh, what="finetune.batch_size")
  n = sources.as_source(train_source).num_examples
  shard = pipeline.HostShard(jax.process_index(), jax.process_count(), ft.batch_size)
  per_epoch = pipeline.steps_per_epoch(n, shard)
  if per_epoch == 0:
    raise UserError(f"finetune.batch_size={ft.batch_size} is larger than the {n} training images; "
                    f"lower finetune.batch_size")
  total = int(round(ft.epochs * per_epoch))
  if total < 1:
    raise UserError(f"finetune.epochs={ft.epochs} is less than one step ({per_epoch} steps per "
                    f"epoch at finetune.batch_size={ft.batch_size}); raise finetune.epochs")
  classes = num_classes(train_source)
  if classes < 2:
    raise UserError(f"the train split has {classes} class; fine-tuning a classifier needs at "
                    f"least 2")
  every = int(round(ft.eval_every_epochs * per_epoch)) if ft.eval_every_epochs > 0 else 0
  if ft.eval_every_epochs > 0 and every < 1:
    raise UserError(f"finetune.eval_every_epochs={ft.eval_every_epochs} is less than one step "
                    f"({per_epoch} steps per epoch); raise it, or 0 to evaluate only at the end")
  return Plan(classes, per_epoch, total, every)


# ------------------------------------------------------------------------------------------ loop
def top1(predict_fn, params, batches, batch_size: int, mesh) -> tuple[float, int]:
  """(share of examples whose predicted class equals its label, examples seen) over `batches`, an
  iterable of (uint8 images [b <= batch_size, S, S, 3], int labels [b]) (pipeline.eval_batches),
  each run as one sharded batch of `batch_size` (zero-padded, the padding ignored): memory holds one
  batch. `predict_fn` (jitted): (params, uint8 batch) -> int32 [batch]."""
  labels = []

  def images():
    for x, y in batches:
      labels.append(np.asarray(y))
      yield x
  predictions = list(evaluation.apply_to_chunks(predict_fn, params, images(), batch_size, mesh))
  correct = sum(int(np.sum(p == y)) for p, y in zip(predictions, labels))
  total = sum(len(y) for y in labels)
  return correct / max(total, 1), total


def train_and_evaluate(config, mesh, train_source, test_source, plan: Plan, backbone=None,
                       report: Callable[[dict], None] = lambda line: None) -> dict:
  """Fine-tunes and returns the final evaluation.

  Args:
    config: the run's config (finetune.*, model.*, data.*, seed).
    mesh: the device mesh (sharding.make_mesh); the batch is split over all of it.
    train_source, test_source: sources (pipeline.load_source) with labels.
    plan: make_plan's.
    backbone: pretrained backbone parameters (the `backbone` subtree of the objective's evaluation
      weights, any sharding), or None for a fresh backbone from `seed`.
    report: called with each evaluation line (every plan.eval_every_steps, and at the end).
  Returns:
    {'test_top1' (0..1, the whole test split), 'test_examples', 'train_loss' (mean over the steps
    since the previous evaluation, nats), 'finetune_steps', 'epoch' (epochs done), 'lr', 'final',
    'eval_s' (seconds evaluating so far), 'finetune_wall_s' (seconds since the start, compile
    included)}.
  Raises:
    UserError: the loss is not finite (lower finetune.base_lr).
  """
  t0 = time.time()
  ft = config.finetune
  size = int(config.model.image_size)
  model = build_classifier(config, plan.num_classes)
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  abstract_params = jax.eval_shape(lambda r: model.init(r, dummy)["params"],
                                   jax.random.key(config.seed))
  tx = make_optimizer(config, abstract_params, plan.total_steps)

  def make_state(params):
    return {"params": params, "opt_state": tx.init(params)}

  shardings = sharding_lib.state_shardings(jax.eval_shape(make_state, abstract_params), mesh)
  params = jax.jit(lambda r: model.init(r, dummy)["params"],
                   out_shardings=shardings["params"])(jax.random.key(config.seed))
  if backbone is not None:
    want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params["backbone"])
    got = jax.tree.map(lambda x: (x.shape, x.dtype), backbone)
    if want != got:
      raise ValueError("the restored backbone's parameters differ from the config's backbone")
    params = {**params, "backbone": jax.device_put(backbone, shardings["params"]["backbone"])}
  train_state = jax.jit(make_state, out_shardings=shardings)(params)
  del params, backbone

  batch_sharding = sharding_lib.batch_sharding(mesh)

  def train_step(st, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, normalize_images(images, config))
      return smoothed_cross_entropy(logits, labels, ft.label_smoothing)
    loss, grads = jax.value_and_grad(loss_fn)(st["params"])
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    return {"params": optax.apply_updates(st["params"], updates), "opt_state": opt_state}, loss

  step_fn = jax.jit(train_step, in_shardings=(shardings, batch_sharding, batch_sharding),
                    out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  predict_fn = jax.jit(
      lambda p, images: jnp.argmax(model.apply({"params": p}, normalize_images(images, config)),
                                   axis=-1).astype(jnp.int32),
      in_shardings=(shardings["params"], batch_sharding), out_shardings=batch_sharding)
  # The whole test split, deterministic views, streamed one batch at a time (an ImageNet-sized
  # split is never in memory at once); any device count (padded like the Evaluator's).
  eval_batch = -(-config.eval.batch_size // mesh.size) * mesh.size
  test_batches = lambda: pipeline.eval_batches(  # noqa: E731
      test_source, size, eval_batch, -1, rng_streams.EVAL_QUERIES)

  shard = pipeline.HostShard(jax.process_index(), jax.process_count(), ft.batch_size)
  batches = train_dataset(train_source, config, shard).as_numpy_iterator()
  losses, eval_s, line = [], 0.0, {}
  log_t, log_step = time.time(), 0
  for step in range(1, plan.total_steps + 1):
    images, labels = next(batches)
    train_state, loss = step_fn(train_state, *sharding_lib.host_to_global((images, labels), mesh))
    losses.append(loss)
    final = step == plan.total_steps
    logs = step % config.log_every_steps == 0
    evaluates = final or (plan.eval_every_steps and step % plan.eval_every_steps == 0)
    if not (logs or evaluates):
      continue
    recent = np.asarray(jax.device_get(losses), np.float64)
    if not np.all(np.isfinite(recent)):
      raise UserError(f"fine-tune loss is {recent[~np.isfinite(recent)][0]} by step {step}; "
                      f"lower finetune.base_lr (now {ft.base_lr})")
    lr = float(learning_rate_at(config, step - 1, plan.total_steps))
    if logs:
      rate = (step - log_step) * ft.batch_size / max(time.time() - log_t, 1e-9)
      logging.info("fine-tune step %d/%d: loss %.4f, lr %.3g, %.0f images/s", step,
                   plan.total_steps, recent[-1], lr, rate)
      log_t, log_step = time.time(), step
    if evaluates:
      e0 = time.time()
      accuracy, examples = top1(predict_fn, train_state["params"], test_batches(), eval_batch,
                                mesh)
      eval_s += time.time() - e0
      line = {"test_top1": accuracy, "test_examples": examples,
              "train_loss": float(recent.mean()), "finetune_steps": step,
              "epoch": step / plan.steps_per_epoch, "lr": lr, "final": bool(final),
              "eval_s": eval_s, "finetune_wall_s": time.time() - t0}
      logging.info("fine-tune step %d: test top-1 %.4f", step, accuracy)
      report(line)
      losses = []
  return line
