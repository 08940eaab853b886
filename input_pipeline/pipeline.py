"""Batching: the per-host, deterministic, resumable training stream and the evaluation arrays.

Training stream, per host, for indexable sources (in-memory arrays, image files):
  host shard (contiguous 1/P of the train split)
  -> epoch e: a permutation drawn from (seed, e, host)          stateless, so any epoch can be rebuilt
  -> skip to the resume position (cheap: skips indices, not decoded images)
  -> read + augment (seeded by (seed, global position, host), so a resumed run sees the same views)
  -> batch(local_batch, drop_remainder) -> prefetch
The global batch is the concatenation of the hosts' local batches (sharding.host_to_global).

Image files: a JPEG that TensorFlow decodes to the pixels Pillow shows (an RGB or grey JPEG not
turned by an EXIF orientation; see `tf_decodes_like_pillow`) reaches the views as its bytes, and
only the window holding the views' crop boxes is decoded (views.jpeg,
tf.image.decode_and_crop_jpeg); every other file (PNG, palette, 16-bit, CMYK or EXIF-rotated JPEG,
...) is decoded whole by Pillow (read_image) and cropped. Which is which is decided once per file
(verify_image_files, or jpeg_routes when verification is off). Either way the crop boxes come from
the same sampler and seeds, and the views are cropped (and flipped) in uint8 before the resize.

A TFDS source is streamed instead (ImageNet does not fit in memory, and its files cannot seek): each
host reads its `tfds.even_splits` part, with file order and shuffle buffer seeded by (seed, start
step); the encoded images are shuffled, and JPEGs decode only their views' window. A resumed TFDS
run therefore draws a fresh order from where it stopped rather than replaying the same views;
in-memory and image-folder runs replay exactly.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from absl import logging
from input_pipeline.tf_runtime import tf
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from input_pipeline import augment, sources, tf_runtime
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
    path: the file, as bytes (what ImageFiles holds; names need not be UTF-8) or str, or a binary
      file object (io.BytesIO of its contents).
  Returns:
    uint8 [H, W, 3], H x W as displayed (after the EXIF rotation).
  Raises:
    PIL.UnidentifiedImageError: not an image Pillow recognises.
    PIL.Image.DecompressionBombError: more than 2 * PIL.Image.MAX_IMAGE_PIXELS pixels (Pillow's
      guard against decompression bombs, kept; between 1x and 2x it only warns, once).
    OSError: the file cannot be read, or is truncated or corrupt; other exceptions (ValueError,
      SyntaxError, EOFError, ...) from Pillow's decoders for other kinds of corrupt file.
  """
  return _read_image(path)[0]


# EXIF orientations that ImageOps.exif_transpose turns the pixels for (1 and unknown values: none).
_TURNED = frozenset(range(2, 9))


def tf_decodes_like_pillow(image: Image.Image) -> bool:
  """Whether `tf.image.decode_jpeg(bytes, channels=3, dct_method="INTEGER_ACCURATE")` gives exactly
  the pixels read_image gives for this opened (not necessarily loaded) file: a JPEG (not an MPO or
  other container) in mode RGB (YCbCr or RGB coded) or L (grey: both replicate it to 3 channels),
  whose EXIF (or XMP) orientation does not turn it (TF ignores orientation). CMYK / YCCK JPEGs,
  and every other format, are read_image's. Both use libjpeg-turbo's accurate integer IDCT."""
  if image.format != "JPEG" or image.mode not in ("RGB", "L"):
    return False
  return image.getexif().get(ExifTags.Base.Orientation, 1) not in _TURNED


def _read_image(path) -> tuple[np.ndarray, bool]:
  """(read_image's pixels, tf_decodes_like_pillow) from one opening of the file."""
  with Image.open(path) as image:
    image.load()
    tf_jpeg = tf_decodes_like_pillow(image)
    image = ImageOps.exif_transpose(image)  # a new image, so closing is safe
  if image.mode == "P":
    # RGB drops alpha, so a palette's transparency changes no pixel; without it Pillow's
    # convert skips a UserWarning ("...should be converted to RGBA") printed during training.
    image.info.pop("transparency", None)
  if image.mode in _SIXTEEN_BIT_GREY:
    grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1)), tf_jpeg
  return np.asarray(image.convert("RGB"), dtype=np.uint8), tf_jpeg


def decode_image_file(path):
  """tf.string scalar path -> uint8 tensor [H, W, 3]: read_image run inside tf.data (training on
  the files TF's JPEG decoder does not take, and with decode_crops=False; evaluation). A file
  read_image cannot decode fails the tf.data iteration with a tf.errors.OpError naming the Python
  exception."""
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


def _failure(e: BaseException) -> bytes:
  detail = (str(e).splitlines() or [type(e).__name__])[0]
  return f"{unreadable_reason(e)}\n{type(e).__name__}: {detail}".encode()


def _check_image(path) -> np.ndarray:
  """'' if read_image decodes `path`, else 'category\\ndetail' (as bytes, for tf.numpy_function)."""
  try:
    read_image(path)
    return np.bytes_(b"")
  except Exception as e:  # noqa: BLE001 -- Pillow's decoders raise many kinds for bad data
    return np.bytes_(_failure(e))


def _check_bytes(data):
  """_check_image on a file's contents, plus (tf_decodes_like_pillow, height, width): for
  tf.numpy_function, so the verification pass reads each file once."""
  try:
    image, tf_jpeg = _read_image(io.BytesIO(data))
    return np.bytes_(b""), np.bool_(tf_jpeg), np.int32(image.shape[0]), np.int32(image.shape[1])
  except Exception as e:  # noqa: BLE001 -- as _check_image
    return np.bytes_(_failure(e)), np.bool_(False), np.int32(0), np.int32(0)


def _tf_reads_jpeg(data, height, width):
  """True, or a tf.data error: TF parses the JPEG header to Pillow's size and decodes the whole
  entropy-coded stream (at 1/8 scale: the bitstream is read in full, the IDCT is cheap)."""
  shape = tf.image.extract_jpeg_shape(data)
  small = tf.io.decode_jpeg(data, channels=3, ratio=8, dct_method=augment.JPEG_DCT_METHOD)
  return tf.logical_and(tf.reduce_all(tf.equal(shape[:2], tf.stack([height, width]))),
                        tf.size(small) > 0)


def verify_image_files(files: sources.ImageFiles, policy: str) -> sources.ImageFiles:
  """Decode every file once (read_image, in tf.data); drop the unreadable ones; note which files
  the training views may decode with TensorFlow's JPEG decoder, crop window only.

  A file is marked for TF's decoder (ImageFiles.jpeg) when tf_decodes_like_pillow says so and TF
  also reads it whole (header size equal to Pillow's, entropy-coded data decodes); a file Pillow
  reads and TF does not stays with Pillow (read_image). Which files are unreadable, and the log
  line or error about them, do not depend on TF: that is Pillow's (read_image's) verdict.

  Args:
    files: an image-folder index (sources.index_image_folder).
    policy: 'skip' (leave unreadable files out; one log line counts them by reason with the first
      example of each) or 'fail'.
  Returns:
    `files` with only the readable images, and `jpeg` (bool [N]) set.
  Raises:
    UserError: an unknown policy; under 'fail', the first unreadable file (named, with why); under
      'skip', when no file at all is readable.
  """
  if policy not in ("skip", "fail"):
    raise UserError(f"data.bad_images={policy!r}; use 'skip' (leave out and count) or 'fail'")
  n = files.num_examples

  def check(i, path):
    data = tf.io.read_file(path)
    why, tf_jpeg, height, width = tf.numpy_function(
        _check_bytes, [data], [tf.string, tf.bool, tf.int32, tf.int32], stateful=False)
    tf_jpeg.set_shape([])
    tf_jpeg = tf.cond(tf_jpeg, lambda: _tf_reads_jpeg(data, height, width),
                      lambda: tf.constant(False))
    return i, why, tf_jpeg

  ds = tf.data.Dataset.from_tensor_slices((tf.range(n), files.paths))
  # A file TF cannot read (or, marked for it, cannot decode) fails its element, which is dropped
  # here and checked again below by Pillow alone, from its path.
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors(log_warning=False)
  why, jpeg = [None] * n, np.zeros(n, bool)
  for i, reason, tf_jpeg in ds.as_numpy_iterator():
    why[i], jpeg[i] = reason, tf_jpeg
  for i in range(n):
    if why[i] is None:
      why[i] = bytes(_check_image(files.paths[i]))
  good = np.array([not r for r in why], bool)
  if good.all():
    return dataclasses.replace(files, jpeg=jpeg)
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
  return sources.ImageFiles(files.paths[good], files.labels[good], files.class_names, jpeg[good])


def _header_route(path) -> np.ndarray:
  """tf_decodes_like_pillow from the file's header (Pillow opens lazily: no pixels are decoded);
  False for anything Pillow cannot open (read_image then fails on it as before)."""
  try:
    with Image.open(path) as image:
      return np.bool_(tf_decodes_like_pillow(image))
  except Exception:  # noqa: BLE001 -- any failure: leave the file to read_image
    return np.bool_(False)


def jpeg_routes(files: sources.ImageFiles, start: int = 0, end: int | None = None) -> np.ndarray:
  """bool [end - start]: which of files[start:end] the training views decode with TF (crop window).

  `files.jpeg` when the verification pass set it; else each file's header is read once here (in
  tf.data, in parallel; Pillow's lazy open, a small fraction of a decode) and judged by
  tf_decodes_like_pillow. Unverified files are not test-decoded by TF: a JPEG that Pillow's header
  parser accepts but libjpeg cannot decode fails the training iteration, as an unreadable file
  does when data.verify_images is off."""
  end = files.num_examples if end is None else end
  if files.jpeg is not None:
    return np.asarray(files.jpeg[start:end], bool)
  ds = tf.data.Dataset.from_tensor_slices(files.paths[start:end]).map(
      lambda p: tf.numpy_function(_header_route, [p], tf.bool, stateful=False),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return np.fromiter(ds.as_numpy_iterator(), bool, count=end - start)


def load_source(config, split: str):
  """sources.load, plus the image-folder check that every file decodes (data.bad_images)."""
  source = sources.load(config, split)
  if isinstance(source, sources.ImageFiles) and config.data.verify_images:
    source = verify_image_files(source, config.data.bad_images)
  return source


def _indexed_images(source, start: int, end: int):
  """(this host's rows as a TF table, index -> float image [H, W, C] in [0, 1]): the whole-image
  loader (decode_crops=False)."""
  if isinstance(source, sources.ImageFiles):
    table = tf.constant(source.paths[start:end])
    return lambda index: tf.cast(decode_image_file(tf.gather(table, index)), tf.float32) / 255.0
  table = tf.constant(source.images[start:end])
  return lambda index: tf.cast(tf.gather(table, index), tf.float32) / 255.0


def _indexed_views(source, start: int, end: int, config, host: int, crops_used=None,
                   windows: int = 0):
  """(global position, index into this host's rows) -> make_views (or make_windows) of that image:
  JPEGs marked in ImageFiles.jpeg / jpeg_routes as their bytes (the views decode their window),
  everything else decoded whole, as uint8."""

  def views_of(image, position):
    return _example_views(image, position, config, host, crops_used, windows)

  if isinstance(source, sources.InMemory):
    table = tf.constant(source.images[start:end])
    return lambda position, index: views_of(tf.gather(table, index), position)
  paths = tf.constant(source.paths[start:end])
  routes = jpeg_routes(source, start, end)

  def from_jpeg(path, position):
    return views_of(views_lib.jpeg(tf.io.read_file(path), channels=3), position)

  def from_pillow(path, position):
    return views_of(decode_image_file(path), position)

  if routes.all() or not routes.any():   # one kind of file: no per-example branch
    decode = from_jpeg if routes.all() else from_pillow
    return lambda position, index: decode(tf.gather(paths, index), position)
  is_jpeg = tf.constant(routes)

  def views(position, index):
    path = tf.gather(paths, index)
    return tf.cond(tf.gather(is_jpeg, index), lambda: from_jpeg(path, position),
                   lambda: from_pillow(path, position))
  return views


def train_dataset(source, config, shard: HostShard, start_step: int = 0, *,
                  decode_crops: bool = True, local_crops_by_step=None, windows: int = 0):
  """The training stream of one host from `start_step`, batched and prefetched.

  Args:
    source: from load_source (sources.InMemory, ImageFiles or TfdsSplit), or a bare uint8 image
      array [N, H, W, C].
    config: the run's config (seed, model.image_size, aug, data.prefetch / shuffle_buffer).
    shard: this host's part of the data and of the global batch.
    start_step: the first step to produce (resume): indexable sources replay exactly the views an
      uninterrupted run would have had from there; TFDS draws a fresh order (module docstring).
    decode_crops: True: JPEGs (image folders: those tf_decodes_like_pillow accepts; TFDS: every
      JPEG) are decoded by TF, only the window holding the views' boxes; views are cropped in
      uint8 (any source) and turned into float only at the view's size.
      False: the previous path, every image decoded whole (image folders: by Pillow) and turned
      into float before cropping; the same boxes, nearly the same views (bench/pipeline.py
      compares the two).
    local_crops_by_step: None (every example gets all aug.local_crops local crops), or
      ((end_step, n), ...) in step order: examples of steps before end_step get only their first
      n local crops made, the rest zeros (step_plan.local_crops_by_step: the stages that train on
      'crops<N>'); steps past the last end_step get the last n. The made crops are unchanged.
    windows: 0: the views are made here. > 0: only the crop windows are (views.make_windows,
      window side `windows` px), for the accelerator to make the views from
      (device_views.views_from_windows; data.augment_on='device' on a file source).
  Returns:
    tf.data.Dataset of {"views": (view0, view1)} uint8 [b, S, S, 3], plus "local_views" (uint8
    [b, L, L, 3] each) for multi-crop recipes; b = shard.local_batch, S = model.image_size.
    With `windows`: {"window": uint8 [b, windows, windows, 3], "boxes": float32 [b, V, 4],
    "position": uint32 [b, 2] (the stream position's high and low words), "host": int32 [b],
    "local_used": int32 [b] (local crops the example's step uses)}, V = 2 + aug.local_crops.
  Raises:
    UserError: the batch does not split over the processes, or exceeds the training set.
  """
  source = sources.as_source(source)
  crops_used = _crops_used(local_crops_by_step, shard.local_batch)
  if shard.global_batch % shard.process_count:
    raise UserError(f"batch_size={shard.global_batch} is not divisible by the "
                    f"{shard.process_count} processes; pick a multiple of {shard.process_count}")
  num_examples = source.num_examples
  per_epoch = steps_per_epoch(num_examples, shard) * shard.local_batch
  if per_epoch == 0:
    raise UserError(f"batch_size={shard.global_batch} is larger than the {num_examples} "
                    f"training images; lower batch_size")
  if isinstance(source, sources.TfdsSplit):
    return _tfds_train_dataset(source, config, shard, start_step, decode_crops, crops_used,
                               windows)
  start, end = shard.shard_bounds(num_examples)
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
  if decode_crops:   # read, decode and augment in one step: bytes (or uint8) reach the views
    ds = ds.map(_indexed_views(source, start, end, config, host, crops_used, windows),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batched(ds, config, shard, windows)
  load_image = _indexed_images(source, start, end)
  ds = ds.map(lambda position, index: (position, load_image(index)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _views_and_batches(ds, config, shard, crops_used, windows)


def _view_seed(config, position, host: int):
  return tf.random.experimental.stateless_fold_in(
      tf.stack([tf.constant(int(config.seed), tf.int64), position]), host)


def _crops_used(local_crops_by_step, local_batch: int):
  """position (int64, this host's stream) -> int32 local crops its step uses; None for all."""
  if not local_crops_by_step:
    return None
  ends = tf.constant([int(end) for end, _ in local_crops_by_step], tf.int64)
  counts = tf.constant([int(n) for _, n in local_crops_by_step], tf.int32)

  def used(position):
    stage = tf.searchsorted(ends, tf.reshape(position // local_batch, [1]), side="right")[0]
    return tf.gather(counts, tf.minimum(stage, len(local_crops_by_step) - 1))
  return used


def _example_views(image, position, config, host: int, crops_used=None, windows: int = 0):
  """make_views of one example at its stream position (its seed, and its step's local crops); with
  `windows`, make_windows plus what the device needs to finish the views (train_dataset)."""
  seed, size = _view_seed(config, position, host), int(config.model.image_size)
  if not windows:
    return views_lib.make_views(image, seed, size, config.aug,
                                None if crops_used is None else crops_used(position))
  out = views_lib.make_windows(image, seed, size, config.aug, windows)
  out["position"] = tf.cast(tf.stack([tf.bitwise.right_shift(position, 32),
                                      tf.bitwise.bitwise_and(position, 0xFFFFFFFF)]), tf.uint32)
  out["host"] = tf.constant(host, tf.int32)
  out["local_used"] = (tf.constant(int(config.aug.local_crops), tf.int32) if crops_used is None
                       else crops_used(position))
  return out


def _views_and_batches(ds, config, shard: HostShard, crops_used=None, windows: int = 0):
  """(global position, decoded image) elements -> augmented views, batched and prefetched."""
  host = shard.process_index
  ds = ds.map(lambda position, image: _example_views(image, position, config, host, crops_used,
                                                     windows),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _batched(ds, config, shard, windows)


def _batched(ds, config, shard: HostShard, windows: int = 0):
  """View dicts -> local batches, in order, prefetched (data.prefetch batches: a batch of 4096
  pairs of 224 px views is 1.2 GB, so not AUTOTUNE). Each map runs its ops on one thread: the
  parallelism is across examples (num_parallel_calls=AUTOTUNE). With `windows`, each crop window
  is padded to windows x windows as it is copied into the batch."""
  if windows:
    shapes = {k: [windows, windows, 3] if k == "window" else spec.shape
              for k, spec in ds.element_spec.items()}
    ds = ds.padded_batch(shard.local_batch, padded_shapes=shapes, drop_remainder=True)
  else:
    ds = ds.batch(shard.local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  return ds.prefetch(int(config.data.prefetch))


def _tfds_builder(source: sources.TfdsSplit):
  tf_runtime.load()   # TF configured (accelerators hidden) before TFDS imports it
  import tensorflow_datasets as tfds  # lazy: heavy, and only the TFDS source needs it
  return tfds, tfds.builder(source.name, data_dir=source.data_dir)


JPEG_MAGIC = b"\xff\xd8\xff"


def _encoded_views(data, channels: int, position, config, host: int, crops_used=None,
                   windows: int = 0):
  """make_views of one encoded TFDS image: a JPEG (magic bytes FF D8 FF) decodes its views' crop
  windows, anything else (PNG, ...) is decoded whole by tf.io.decode_image, as TFDS would."""
  return tf.cond(
      tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC),
      lambda: _example_views(views_lib.jpeg(data, channels), position, config, host, crops_used,
                             windows),
      lambda: _example_views(tf.io.decode_image(data, channels=channels, expand_animations=False),
                             position, config, host, crops_used, windows))


def _tfds_train_dataset(source: sources.TfdsSplit, config, shard: HostShard, start_step: int,
                        decode_crops: bool = True, crops_used=None, windows: int = 0):
  """train_dataset for a TFDS split: this host's even split, files and buffer shuffled by (seed,
  start_step); with decode_crops, the images stay encoded through the shuffle and each example's
  views decode only their crop window (JPEG) or the whole image (anything else)."""
  tfds, builder = _tfds_builder(source)
  host_split = tfds.even_splits(source.split, n=shard.process_count,
                                drop_remainder=True)[shard.process_index]
  shuffle_seed = int(config.seed) * rng_streams.TFDS_SHUFFLE_STRIDE + start_step
  feature = builder.info.features["image"]
  # Encoded images stay encoded through the shuffle buffer (~10x smaller than decoded). Only 8-bit
  # grey or RGB image features: others (uint16, RGBA, ...) are decoded by TFDS, as before.
  encoded = (decode_crops and isinstance(feature, tfds.features.Image)
             and np.dtype(feature.np_dtype) == np.uint8 and feature.shape[-1] in (1, 3, None))
  ds = builder.as_dataset(split=host_split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
                          decoders={"image": tfds.decode.SkipDecoding()} if encoded else None)
  if encoded:
    ds = ds.map(lambda example: example["image"])
  else:
    ds = ds.map(lambda example: tf.cast(example["image"], tf.float32) / 255.0,
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.repeat().shuffle(int(config.data.shuffle_buffer), seed=shuffle_seed)
  ds = ds.enumerate(start=start_step * shard.local_batch)
  if not encoded:
    return _views_and_batches(ds, config, shard, crops_used, windows)
  channels = feature.shape[-1] or 3
  host = shard.process_index
  ds = ds.map(lambda position, data: _encoded_views(data, channels, position, config, host,
                                                    crops_used, windows),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _batched(ds, config, shard, windows)


def eval_view(image, size: int):
  """Deterministic evaluation input: shorter side resized to `size`, centre crop (a square image
  is just resized), 3 channels, uint8."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = float(size) / tf.reduce_min(shape)
  new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, size, size)
  return views_lib.to_rgb_uint8(tf.clip_by_value(image, 0.0, 1.0))


def eval_batches(source, size: int, batch_size: int, limit: int = -1, seed: int = 0):
  """The evaluation inputs of eval_arrays, `batch_size` examples at a time (the last may be
  shorter): (uint8 [b, size, size, 3], int labels [b]) in a fixed order, so memory holds one batch
  however large the split (ImageNet's 50k validation images at 224 px are 7.5 GB as one array).
  Indexable sources: a seeded random subset of at most `limit` (<= 0: all), in index order; TFDS:
  the first `limit` in file order."""
  source = sources.as_source(source)
  if isinstance(source, sources.InMemory):
    images, labels = subsample(source.images, source.labels, limit, seed)
    for start in range(0, images.shape[0], batch_size):
      yield (eval_images(images[start:start + batch_size], size),
             labels[start:start + batch_size])
    return
  if isinstance(source, sources.ImageFiles):
    n = source.num_examples
    idx = (np.arange(n) if limit <= 0 or limit >= n
           else np.sort(np.random.default_rng(seed).permutation(n)[:limit]))
    ds = tf.data.Dataset.from_tensor_slices((source.paths[idx], source.labels[idx]))
    ds = ds.map(lambda p, label: (eval_view(tf.cast(decode_image_file(p), tf.float32) / 255.0,
                                            size), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    tfds, builder = _tfds_builder(source)
    ds = builder.as_dataset(split=source.split, shuffle_files=False, as_supervised=True)
    if limit > 0:
      ds = ds.take(limit)
    ds = ds.map(lambda image, label: (eval_view(tf.cast(image, tf.float32) / 255.0, size),
                                      tf.cast(label, tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from ds.batch(batch_size).prefetch(1).as_numpy_iterator()


def eval_arrays(source, size: int, limit: int, seed: int):
  """A fixed subset of at most `limit` examples (<= 0: all) as (uint8 [n, size, size, 3], labels):
  eval_batches, concatenated. Indexable sources: a seeded random subset; TFDS: the first `limit`
  in file order."""
  batches = list(eval_batches(source, size, 256, limit, seed))
  return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))


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
