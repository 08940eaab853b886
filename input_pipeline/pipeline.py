"""Batching: the per-host, deterministic, resumable training stream and the evaluation arrays.

Training stream, per host, for indexable sources (in-memory arrays, image files):
  host shard (contiguous 1/P of the train split)
  -> epoch e: a permutation drawn from (seed, e, host)          stateless, so any epoch can be rebuilt
  -> skip to the resume position (cheap: skips indices, not decoded images)
  -> gather + augment (seeded by (seed, global position, host), so a resumed run sees the same views)
  -> batch(local_batch, drop_remainder) -> prefetch
The global batch is the concatenation of the hosts' local batches (sharding.host_to_global).

A TFDS source is streamed instead (ImageNet does not fit in memory, and its files cannot seek): each
host reads its `tfds.even_splits` part, with file order and shuffle buffer seeded by (seed, start
step). A resumed TFDS run therefore draws a fresh order from where it stopped rather than replaying
the same views; in-memory and image-folder runs replay exactly.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging
from input_pipeline.tf_runtime import tf
from PIL import Image, ImageOps, UnidentifiedImageError

from input_pipeline import sources
from input_pipeline import views as views_lib
from vit_accel import rng_streams
from vit_accel.errors import UserError


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which part of the training data and of the global batch this process owns (its shard;
  not a data split such as train/test)."""
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


def steps_per_epoch(num_examples: int, shard: HostShard) -> int:
  start, end = shard.shard_bounds(num_examples)
  return (end - start) // shard.local_batch


# Pillow holds 16-bit grey (PNG, TIFF) as integers 0..65535, and its convert("RGB") clips them at
# 255 (a mostly white image); viewers, and Pillow itself for 16-bit RGB / RGBA / grey+alpha PNGs,
# keep the high byte. These modes are reduced the same way.
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path) -> np.ndarray:
  """Decode one image file as an image viewer shows it; the one decoder of image-folder files.

  Pixels equal `PIL.ImageOps.exif_transpose(PIL.Image.open(path)).convert("RGB")`: EXIF orientation
  applied, palettes (also 8- and 1-bit BMP) looked up, grey replicated, alpha dropped (not
  composited), CMYK converted, first frame of an animation. One exception: 16-bit grey keeps the
  high byte of each value (Pillow's convert would clip at 255).

  Args:
    path: the file, as bytes (what ImageFiles holds; names need not be UTF-8) or str.
  Returns:
    uint8 [H, W, 3], H x W as displayed (after the EXIF rotation).
  Raises:
    PIL.UnidentifiedImageError: not an image Pillow recognises.
    PIL.Image.DecompressionBombError: more than 2 * PIL.Image.MAX_IMAGE_PIXELS pixels (Pillow's
      guard against decompression bombs, kept; between 1x and 2x it only warns, once).
    OSError: the file cannot be read, or is truncated or corrupt; other exceptions (ValueError,
      SyntaxError, EOFError, ...) from Pillow's decoders for other kinds of corrupt file.
  """
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image)  # loads the pixels; a new image, so closing is safe
  if image.mode == "P":
    # RGB drops alpha, so a palette's transparency changes no pixel; without it Pillow's
    # convert skips a UserWarning ("...should be converted to RGBA") printed during training.
    image.info.pop("transparency", None)
  if image.mode in _SIXTEEN_BIT_GREY:
    grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image_file(path):
  """tf.string scalar path -> uint8 tensor [H, W, 3]: read_image run inside tf.data (training,
  evaluation and the verification pass all decode through it). A file read_image cannot decode
  fails the tf.data iteration with a tf.errors.OpError naming the Python exception."""
  image = tf.numpy_function(read_image, [path], tf.uint8, stateful=False)
  image.set_shape([None, None, 3])
  return image


def unreadable_reason(exc: BaseException) -> str:
  """The log's category for an exception read_image raised."""
  if isinstance(exc, Image.DecompressionBombError):
    return "over Pillow's decompression-bomb pixel limit"
  if isinstance(exc, UnidentifiedImageError):
    return "not an image Pillow recognises"
  if isinstance(exc, OSError) and exc.errno is not None:
    return "cannot be opened"
  return "corrupt or truncated"


def _check_image(path) -> np.ndarray:
  """'' if read_image decodes `path`, else 'category\\ndetail' (as bytes, for tf.numpy_function)."""
  try:
    read_image(path)
    return np.bytes_(b"")
  except Exception as e:  # noqa: BLE001 -- Pillow's decoders raise many kinds for bad data
    detail = (str(e).splitlines() or [type(e).__name__])[0]
    return np.bytes_(f"{unreadable_reason(e)}\n{type(e).__name__}: {detail}".encode())


def verify_image_files(files: sources.ImageFiles, policy: str) -> sources.ImageFiles:
  """Decode every file once (read_image, in tf.data); drop the unreadable ones.

  Args:
    files: an image-folder index (sources.index_image_folder).
    policy: 'skip' (leave unreadable files out; one log line counts them by reason with the first
      example of each) or 'fail'.
  Returns:
    `files` with only the readable images (the same object when all are).
  Raises:
    UserError: an unknown policy; under 'fail', the first unreadable file (named, with why); under
      'skip', when no file at all is readable.
  """
  if policy not in ("skip", "fail"):
    raise UserError(f"data.bad_images={policy!r}; use 'skip' (leave out and count) or 'fail'")
  n = files.num_examples
  ds = tf.data.Dataset.from_tensor_slices((tf.range(n), files.paths))
  ds = ds.map(lambda i, p: (i, tf.numpy_function(_check_image, [p], tf.string, stateful=False)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  why = [b""] * n
  for i, reason in ds.as_numpy_iterator():
    why[i] = reason
  good = np.array([not r for r in why], bool)
  if good.all():
    return files
  bad = np.flatnonzero(~good)  # index order: the first example is the same on every run
  by_reason = {}
  for i in bad:
    category, detail = why[i].decode().split("\n", 1)
    by_reason.setdefault(category, []).append((i, detail))
  if policy == "fail":
    first, reason = sources.display_path(files.paths[bad[0]]), why[bad[0]].decode()
    raise UserError(f"{first} is not a readable image ({reason.replace(chr(10), ': ')}; "
                    f"{len(bad)} such file(s)); fix or remove it, or set "
                    f"--config.data.bad_images=skip")
  summary = "; ".join(
      f"{len(items)} {category} (first: {sources.display_path(files.paths[items[0][0]])}: "
      f"{items[0][1]})" for category, items in by_reason.items())
  logging.warning("skipped %d of %d files that are not readable images: %s", len(bad), n, summary)
  if not good.any():
    under = os.path.commonpath([os.path.dirname(f) for f in files.paths])
    raise UserError(f"none of the {n} files under {sources.display_path(under)} is a readable "
                    f"image ({summary})")
  return sources.ImageFiles(files.paths[good], files.labels[good], files.class_names)


def load_source(config, split: str):
  """sources.load, plus the image-folder check that every file decodes (data.bad_images)."""
  source = sources.load(config, split)
  if isinstance(source, sources.ImageFiles) and config.data.verify_images:
    source = verify_image_files(source, config.data.bad_images)
  return source


def _indexed_images(source, start: int, end: int):
  """(this host's rows as a TF table, index -> float image [H, W, C] in [0, 1])."""
  if isinstance(source, sources.ImageFiles):
    table = tf.constant(source.paths[start:end])
    return lambda index: tf.cast(decode_image_file(tf.gather(table, index)), tf.float32) / 255.0
  table = tf.constant(source.images[start:end])
  return lambda index: tf.cast(tf.gather(table, index), tf.float32) / 255.0


def train_dataset(source, config, shard: HostShard, start_step: int = 0):
  """A tf.data stream of local batches from `start_step`: {"views": (view0, view1)} uint8 [b, S, S, 3],
  plus "local_views" (uint8 [b, L, L, 3] each) for multi-crop recipes. `source`: from load_source
  (or a bare uint8 image array)."""
  source = sources.as_source(source)
  if shard.global_batch % shard.process_count:
    raise UserError(f"batch_size={shard.global_batch} is not divisible by the "
                    f"{shard.process_count} processes; pick a multiple of {shard.process_count}")
  num_examples = source.num_examples
  per_epoch = steps_per_epoch(num_examples, shard) * shard.local_batch
  if per_epoch == 0:
    raise UserError(f"batch_size={shard.global_batch} is larger than the {num_examples} "
                    f"training images; lower batch_size")
  if isinstance(source, sources.TfdsSplit):
    return _tfds_train_dataset(source, config, shard, start_step)
  start, end = shard.shard_bounds(num_examples)
  load_image = _indexed_images(source, start, end)
  shard_size = end - start
  first = start_step * shard.local_batch
  first_epoch, offset = divmod(first, per_epoch)
  seed = int(config.seed)
  host = shard.process_index

  def epoch_examples(epoch):
    perm = tf.argsort(tf.random.stateless_uniform(
        [shard_size], seed=tf.stack([tf.constant(seed, tf.int64), epoch * rng_streams.EPOCH_HOST_STRIDE + host])))
    positions = epoch * per_epoch + tf.range(per_epoch, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, perm[:per_epoch]))

  ds = tf.data.Dataset.range(first_epoch, 2**40).flat_map(epoch_examples).skip(offset)
  ds = ds.map(lambda position, index: (position, load_image(index)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _views_and_batches(ds, config, shard)


def _view_seed(config, position, host: int):
  return tf.random.experimental.stateless_fold_in(
      tf.stack([tf.constant(int(config.seed), tf.int64), position]), host)


def _views_and_batches(ds, config, shard: HostShard):
  """(global position, float image) elements -> augmented views, batched and prefetched."""
  size = int(config.model.image_size)
  aug = config.aug
  host = shard.process_index
  ds = ds.map(lambda position, image: views_lib.make_views(image, _view_seed(config, position,
                                                                              host), size, aug),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(shard.local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  return ds.prefetch(int(config.data.prefetch))


def _tfds_builder(source: sources.TfdsSplit):
  import tensorflow_datasets as tfds  # lazy: heavy, and only the TFDS source needs it
  return tfds, tfds.builder(source.name, data_dir=source.data_dir)


def _tfds_train_dataset(source: sources.TfdsSplit, config, shard: HostShard, start_step: int):
  tfds, builder = _tfds_builder(source)
  host_split = tfds.even_splits(source.split, n=shard.process_count,
                                drop_remainder=True)[shard.process_index]
  shuffle_seed = int(config.seed) * rng_streams.TFDS_SHUFFLE_STRIDE + start_step
  ds = builder.as_dataset(split=host_split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
  ds = ds.map(lambda example: tf.cast(example["image"], tf.float32) / 255.0,
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.repeat().shuffle(int(config.data.shuffle_buffer), seed=shuffle_seed)
  ds = ds.enumerate(start=start_step * shard.local_batch)
  return _views_and_batches(ds, config, shard)


def eval_view(image, size: int):
  """Deterministic evaluation input: shorter side resized to `size`, centre crop (a square image
  is just resized), 3 channels, uint8."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = float(size) / tf.reduce_min(shape)
  new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, size, size)
  return views_lib.to_rgb_uint8(tf.clip_by_value(image, 0.0, 1.0))


def eval_arrays(source, size: int, limit: int, seed: int):
  """A fixed subset of at most `limit` examples (<= 0: all) as (uint8 [n, size, size, 3], labels).
  Indexable sources: a seeded random subset; TFDS: the first `limit` in file order."""
  source = sources.as_source(source)
  if isinstance(source, sources.InMemory):
    images, labels = subsample(source.images, source.labels, limit, seed)
    return eval_images(images, size), labels
  if isinstance(source, sources.ImageFiles):
    n = source.num_examples
    idx = (np.arange(n) if limit <= 0 or limit >= n
           else np.sort(np.random.default_rng(seed).permutation(n)[:limit]))
    ds = tf.data.Dataset.from_tensor_slices(source.paths[idx])
    ds = ds.map(lambda p: eval_view(tf.cast(decode_image_file(p), tf.float32) / 255.0, size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.concatenate(list(ds.batch(256).as_numpy_iterator())), source.labels[idx]
  tfds, builder = _tfds_builder(source)
  ds = builder.as_dataset(split=source.split, shuffle_files=False, as_supervised=True)
  if limit > 0:
    ds = ds.take(limit)
  ds = ds.map(lambda image, label: (eval_view(tf.cast(image, tf.float32) / 255.0, size), label),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = list(ds.batch(256).as_numpy_iterator())
  return (np.concatenate([b[0] for b in batches]),
          np.concatenate([b[1] for b in batches]).astype(np.int32))


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
