"""Input pipeline: IDX reading, determinism, resume position, host split, dtypes, augment ops."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from input_pipeline import augment, pipeline, sources
from vit_accel.errors import UserError


def synthetic_images(n=96, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def take(ds, k):
  return [b for _, b in zip(range(k), ds.as_numpy_iterator())]


def test_batches_are_uint8_with_expected_shapes_and_range():
  cfg = tiny_config()
  ds = pipeline.train_dataset(synthetic_images(), cfg, pipeline.HostShard(0, 1, 16))
  batch = take(ds, 1)[0]
  v0, v1 = batch["views"]
  for v in (v0, v1):
    assert v.dtype == np.uint8 and v.shape == (16, 32, 32, 3)
    assert v.max() > 100  # not collapsed to black
    np.testing.assert_array_equal(v[..., 0], v[..., 2])  # grey tiled to 3 channels
  assert not np.array_equal(v0, v1)  # two different augmentations


def test_same_seed_same_stream_other_seed_other_stream():
  images = synthetic_images()
  a = take(pipeline.train_dataset(images, tiny_config(), pipeline.HostShard(0, 1, 16)), 3)
  b = take(pipeline.train_dataset(images, tiny_config(), pipeline.HostShard(0, 1, 16)), 3)
  c = take(pipeline.train_dataset(images, tiny_config(seed=1), pipeline.HostShard(0, 1, 16)), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["views"][0], y["views"][0])
  assert not np.array_equal(a[0]["views"][0], c[0]["views"][0])


def test_resume_position_reproduces_the_stream_across_epochs():
  images = synthetic_images(n=40)  # 2 steps of 16 per epoch: stream crosses epoch boundaries
  shard = pipeline.HostShard(0, 1, 16)
  full = take(pipeline.train_dataset(images, tiny_config(), shard), 7)
  resumed = take(pipeline.train_dataset(images, tiny_config(), shard, start_step=3), 4)
  for x, y in zip(full[3:], resumed):
    np.testing.assert_array_equal(x["views"][0], y["views"][0])
    np.testing.assert_array_equal(x["views"][1], y["views"][1])
  # Different epochs see different orders.
  assert not np.array_equal(full[0]["views"][0], full[2]["views"][0])


def test_hosts_read_disjoint_shards():
  images = np.arange(64, dtype=np.uint8).reshape(64, 1, 1, 1) * np.ones((1, 32, 32, 1), np.uint8)
  cfg = tiny_config()
  cfg.aug.crop_scale = (1.0, 1.0)
  cfg.aug.crop_ratio = (1.0, 1.0)
  cfg.aug.jitter_p = 0.0
  seen = []
  for host in range(2):
    shard = pipeline.HostShard(host, 2, 16)
    assert shard.local_batch == 8
    batches = take(pipeline.train_dataset(images, cfg, shard), 4)  # one epoch of the shard
    seen.append({int(v[0, 0, 0]) for b in batches for v in b["views"][0]})
  assert seen[0] == set(range(32)) and seen[1] == set(range(32, 64))


def test_batch_not_divisible_by_processes_is_a_clear_error():
  with pytest.raises(UserError, match="not divisible"):
    pipeline.train_dataset(synthetic_images(), tiny_config(), pipeline.HostShard(0, 3, 16))


@pytest.mark.parametrize("op", ["crop", "flip", "jitter", "blur", "solarize", "grey"])
def test_augment_ops_same_eagerly_and_in_tf_data(op):
  fns = {
      "crop": lambda im, s: augment.random_resized_crop(im, s, 24, scale=(0.2, 1.0)),
      "flip": augment.random_flip,
      "jitter": lambda im, s: augment.color_jitter(im, s, 0.4, 0.4, 0.4, 0.1),
      "blur": augment.gaussian_blur,
      "solarize": lambda im, s: augment.solarize(im),
      "grey": lambda im, s: augment.to_grayscale(im),
  }
  fn = fns[op]
  image = tf.constant(np.random.default_rng(0).uniform(size=(32, 32, 3)), tf.float32)
  seed = tf.constant([3, 4], tf.int64)
  eager = fn(image, seed).numpy()
  in_graph = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(fn))).numpy()
  np.testing.assert_allclose(eager, in_graph, atol=1e-6)
  assert eager.min() >= 0.0 and eager.max() <= 1.0 + 1e-6


def test_color_jitter_changes_image_and_solarize_inverts_bright_pixels():
  image = tf.fill([8, 8, 3], 0.8)
  jittered = augment.color_jitter(image, tf.constant([1, 2], tf.int64), brightness=0.5, contrast=0)
  assert not np.allclose(jittered.numpy(), 0.8)
  np.testing.assert_allclose(augment.solarize(image).numpy(), 0.2, atol=1e-6)


def write_idx(path, array):
  codes = {np.uint8: 0x08}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(
      ">" + "I" * array.ndim, *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def test_idx_reader_roundtrip_and_padding(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = np.arange(5, dtype=np.uint8)
  for split, (img_name, lbl_name) in sources.FASHION_MNIST_FILES.items():
    write_idx(tmp_path / img_name, images)
    write_idx(tmp_path / lbl_name, labels)
  x, y = sources.load_fashion_mnist(str(tmp_path), "train")
  assert x.shape == (5, 32, 32, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], images)
  assert x[:, :2].max() == 0 and x[:, 30:].max() == 0
  np.testing.assert_array_equal(y, labels)


def test_truncated_idx_is_a_clear_error(tmp_path):
  path = tmp_path / "bad.gz"
  with gzip.open(path, "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x00" * 10)
  with pytest.raises(UserError, match="truncated"):
    sources.read_idx(str(path))


def test_missing_data_fails_fast_with_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke",
       f"--workdir={tmp_path / 'run'}", f"--config.data.dir={tmp_path / 'nowhere'}"],
      cwd=root, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1
  assert "dataset-fashion-mnist" in lines[0] and "data.dir" in lines[0]
  assert not (tmp_path / "run").exists()  # nothing created for a run that could not start


def test_real_fashion_mnist_loads(needs_fashion_mnist):
  x, y = sources.load_fashion_mnist(sources.FASHION_MNIST_DEFAULT_DIR, "test")
  assert x.shape == (10000, 32, 32, 1) and y.shape == (10000,)
  assert set(np.unique(y)) == set(range(10))


def test_uint8_views_match_the_float_whole_image_path():
  """In-memory images reach the views as uint8 (cropped and flipped before the float resize); the
  old path converted the whole image to float first. Same boxes, same draws: within rounding."""
  cfg = tiny_config()
  images = np.random.default_rng(3).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
  shard = pipeline.HostShard(0, 1, 16)
  new = take(pipeline.train_dataset(images, cfg, shard), 2)
  old = take(pipeline.train_dataset(images, cfg, shard, decode_crops=False), 2)
  for x, y in zip(new, old):
    for a, b in zip(x["views"], y["views"]):
      assert np.abs(a.astype(int) - b).max() <= 1


def test_cheap_colour_ops_equal_their_textbook_definitions():
  """The ops are computed the cheap way (3x3 colour matrices, channel means, one-op clips, a blur
  kernel cut at 4 sigma); each equals its plain definition on the same draw."""
  rng = np.random.default_rng(5)
  image = tf.constant(rng.uniform(size=(40, 40, 3)), tf.float32)
  seed = tf.constant([9, 2], tf.int64)
  w = tf.constant([0.299, 0.587, 0.114])
  luma = tf.reduce_sum(image * w, axis=-1, keepdims=True)
  f = tf.random.stateless_uniform([], seed, 0.6, 1.4)

  def close(a, b, atol=1e-5):   # float rounding (matmul order), far below a uint8 level
    np.testing.assert_allclose(a.numpy(), b.numpy() if hasattr(b, "numpy") else b, atol=atol)

  close(augment.adjust_brightness(image, seed, 0.4), tf.clip_by_value(image * f, 0.0, 1.0))
  mean = tf.reduce_mean(luma)
  close(augment.adjust_contrast(image, seed, 0.4),
        tf.clip_by_value((image - mean) * f + mean, 0.0, 1.0))
  close(augment.adjust_saturation(image, seed, 0.4),
        tf.clip_by_value((image - luma) * f + luma, 0.0, 1.0))
  close(augment.to_grayscale(image), tf.broadcast_to(luma, image.shape))
  close(augment.solarize(image), tf.where(image < 0.5, image, 1.0 - image), atol=0)
  assert not np.allclose(augment.solarize(image).numpy(), image.numpy())
  # Blur: the full 10%-of-the-side kernel (radius 2 at 40 px; at 224 px radius 12 vs 4 sigma <= 8).
  big = tf.constant(rng.uniform(size=(224, 224, 3)) > 0.5, tf.float32)   # worst case: hard edges
  for k in range(6):
    s = tf.constant([k, 4], tf.int64)
    sigma = tf.random.stateless_uniform([], s, 0.1, 2.0)
    x = tf.cast(tf.range(-12, 13), tf.float32)
    kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    kernel /= tf.reduce_sum(kernel)
    full = tf.nn.depthwise_conv2d(big[None], tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1]),
                                  [1, 1, 1, 1], "SAME")
    full = tf.nn.depthwise_conv2d(full, tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1]),
                                  [1, 1, 1, 1], "SAME")[0]
    close(augment.gaussian_blur(big, s, (0.1, 2.0)), full, atol=1e-4)   # < 0.03 of a uint8 level
  # Resizing: no antialiasing filter when the crop only grows (it is the identity there).
  small = tf.constant(rng.uniform(size=(30, 50, 3)), tf.float32)
  close(augment.resize_crop(small, 64),
        tf.image.resize(small[None], (64, 64), antialias=True)[0])
  large = tf.constant(rng.integers(0, 256, (90, 70, 3)), tf.uint8)
  close(augment.resize_crop(large, 64),
        tf.image.resize(tf.cast(large, tf.float32)[None] / 255.0, (64, 64), antialias=True)[0])


def test_downscale_filters_shrink_by_area_or_sampling_and_enlarge_bilinearly():
  """aug.downscale: 'area' averages each output pixel's footprint along a shrinking side (an exact
  2x shrink is the mean of pixel pairs) and is plain bilinear along a growing side (not the
  repeated pixels an area resize gives there); 'bilinear' samples; a bad name is a ValueError."""
  rng = np.random.default_rng(7)
  values = rng.uniform(size=128).astype(np.float32)
  pairs = values.reshape(64, 2).mean(axis=1)
  ramp = np.linspace(0.0, 1.0, 20, dtype=np.float32)
  for side in (0, 1):   # the shrinking side: rows (tall crop), then columns (wide crop)
    def orient(a):      # a [shrinking, growing] -> the crop's [H, W, 3]
      return tf.constant(np.repeat((a if side == 0 else a.T)[..., None], 3, -1))
    # 128 -> 64 along the shrinking side: pairs averaged; 20 -> 64 along the other: bilinear.
    out = augment.resize_crop(orient(np.broadcast_to(values[:, None], (128, 20))), 64, "area")
    out = out.numpy()[..., 0] if side == 0 else out.numpy()[..., 0].T
    np.testing.assert_allclose(out, np.broadcast_to(pairs[:, None], (64, 64)), atol=1e-6)
    # A ramp along the growing side stays linear inside (a repeated-pixel resize is a staircase).
    crop = orient(np.broadcast_to(ramp[None, :], (128, 20)))
    out = augment.resize_crop(crop, 64, "area").numpy()[..., 0]
    out = out if side == 0 else out.T
    steps = np.diff(out[0, 4:-4])
    np.testing.assert_allclose(steps, steps.mean(), atol=1e-5)
    np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-6)
  # A side exactly the view's size is left as it is; a 1-pixel crop becomes a constant view.
  exact = tf.constant(rng.uniform(size=(64, 128, 3)), tf.float32)
  np.testing.assert_allclose(augment.resize_crop(exact, 64, "area").numpy(),
                             tf.image.resize(exact[None], (64, 64), method="area")[0].numpy(),
                             atol=1e-6)
  dot = tf.constant([[[0.25, 0.5, 0.75]]], tf.float32)
  for name in augment.DOWNSCALE_FILTERS:
    np.testing.assert_allclose(augment.resize_crop(dot, 8, name).numpy(),
                               np.broadcast_to([0.25, 0.5, 0.75], (8, 8, 3)), atol=1e-6)
  # Both sides shrinking 3x: area and antialias low-pass (the mean of 9 pixels: a third of the
  # noise's spread is left), plain sampling keeps one pixel in 9 (all of it).
  noise = tf.constant(rng.integers(0, 256, (192, 192, 3)), tf.uint8)
  spread = {name: augment.resize_crop(noise, 64, name).numpy().std()
            for name in augment.DOWNSCALE_FILTERS}
  full = noise.numpy().std() / 255.0
  assert spread["area"] == pytest.approx(full / 3, rel=0.1)
  assert spread["antialias"] < 0.5 * full < spread["bilinear"]
  # Only growing: every filter is the same bilinear resize.
  small = tf.constant(rng.uniform(size=(30, 50, 3)), tf.float32)
  for name in augment.DOWNSCALE_FILTERS:
    np.testing.assert_allclose(augment.resize_crop(small, 64, name).numpy(),
                               augment.resize_crop(small, 64).numpy(), atol=1e-6)
  # In a graph, with the crop's size unknown until it runs (as in tf.data), the view's is static.
  graph = tf.function(lambda x: augment.resize_crop(x, 32, "area"),
                      input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
  assert graph.get_concrete_function().structured_outputs.shape == (32, 32, 3)
  np.testing.assert_allclose(graph(exact).numpy(), augment.resize_crop(exact, 32, "area").numpy())
  with pytest.raises(ValueError, match="downscale"):
    augment.resize_crop(small, 64, "lanczos")


def test_downscale_reaches_the_views():
  """aug.downscale is what make_views shrinks crops with: on a noisy image larger than the view,
  'area' and 'antialias' views differ (and 'antialias' is the recipes' default)."""
  from input_pipeline import recipes, views
  aug = recipes.byol_asymmetric(image_size=32)
  assert aug.downscale == "antialias"
  image = tf.constant(np.random.default_rng(8).integers(0, 256, (160, 160, 3)), tf.uint8)
  seed = tf.constant([1, 2], tf.int64)
  default = views.make_views(image, seed, 32, aug)["views"][0].numpy()
  aug.downscale = "area"
  area = views.make_views(image, seed, 32, aug)["views"][0].numpy()
  assert np.abs(default.astype(int) - area).max() > 2
