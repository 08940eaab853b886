"""Batching: the per-host, deterministic, resumable training stream and the evaluation arrays.

Training stream, per host:
  host shard (contiguous 1/P of the train split)
  -> epoch e: a permutation drawn from (seed, e, host)          stateless, so any epoch can be rebuilt
  -> skip to the resume position (cheap: skips indices, not decoded images)
  -> gather + augment (seeded by (seed, global position, host), so a resumed run sees the same views)
  -> batch(local_batch, drop_remainder) -> prefetch
The global batch is the concatenation of the hosts' local batches (sharding.host_to_global).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from input_pipeline.tf_runtime import tf

from input_pipeline import views as views_lib
from vit_accel.errors import UserError


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """Which part of the data and of the global batch this process owns."""
  process_index: int
  process_count: int
  global_batch: int

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.process_count

  def shard_bounds(self, num_examples: int) -> tuple[int, int]:
    per_host = num_examples // self.process_count  # equal shards: every host runs the same steps
    start = self.process_index * per_host
    return start, start + per_host


def steps_per_epoch(num_examples: int, split: HostSplit) -> int:
  start, end = split.shard_bounds(num_examples)
  return (end - start) // split.local_batch


def train_dataset(images: np.ndarray, config, split: HostSplit, start_step: int = 0):
  """A tf.data stream of local batches from `start_step`: {"views": (view0, view1)} uint8 [b, S, S, 3],
  plus "local_views" (uint8 [b, L, L, 3] each) for multi-crop recipes."""
  if split.global_batch % split.process_count:
    raise UserError(f"batch_size={split.global_batch} is not divisible by the "
                    f"{split.process_count} processes; pick a multiple of {split.process_count}")
  start, end = split.shard_bounds(images.shape[0])
  host_images = tf.constant(images[start:end])
  shard_size = end - start
  per_epoch = steps_per_epoch(images.shape[0], split) * split.local_batch
  if per_epoch == 0:
    raise UserError(f"batch_size={split.global_batch} is larger than the {images.shape[0]} "
                    f"training images; lower batch_size")
  first = start_step * split.local_batch
  first_epoch, offset = divmod(first, per_epoch)
  seed = int(config.seed)
  host = split.process_index

  def epoch_examples(epoch):
    perm = tf.argsort(tf.random.stateless_uniform(
        [shard_size], seed=tf.stack([tf.constant(seed, tf.int64), epoch * 65536 + host])))
    positions = epoch * per_epoch + tf.range(per_epoch, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, perm[:per_epoch]))

  size = int(config.model.image_size)
  aug = config.aug

  def make_views(position, index):
    image = tf.cast(tf.gather(host_images, index), tf.float32) / 255.0
    view_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), position]), host)
    return views_lib.make_views(image, view_seed, size, aug)

  ds = tf.data.Dataset.range(first_epoch, 2**40).flat_map(epoch_examples).skip(offset)
  ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(split.local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  return ds.prefetch(int(config.data.prefetch))


def eval_images(images: np.ndarray, size: int) -> np.ndarray:
  """Deterministic evaluation inputs: uint8 [N, size, size, 3] (no augmentation)."""
  if images.shape[1] != size or images.shape[2] != size:
    images = tf.image.resize(images, (size, size), antialias=True).numpy()
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def subsample(images: np.ndarray, labels: np.ndarray, limit: int, seed: int):
  """A fixed, class-agnostic random subset of at most `limit` examples (limit <= 0: all)."""
  if limit <= 0 or limit >= images.shape[0]:
    return images, labels
  idx = np.sort(np.random.default_rng(seed).permutation(images.shape[0])[:limit])
  return images[idx], labels[idx]
