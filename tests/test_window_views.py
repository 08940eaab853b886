"""Views made on the device from host-decoded crop windows (data.augment_on='device' on a file
source: views.make_windows on the host, device_views.views_from_windows on the accelerator): the
host's crop boxes (so the crop statistics are the host path's, box for box), the host's resize to
float rounding, windows larger than data.window_size shrunk with their boxes, the stream's contract,
replay on resume and local crops by step. Every file is generated here."""
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from input_pipeline import device_views, pipeline, recipes, sources, streams, views
from test_jpeg_crop_decode import jpeg_bytes, photo, plain
from vit_accel import config_checks, sharding

SIZE = 48


def image_files(tmp_path, n=16, shape=(150, 200)):
  """n different JPEG photos in one class folder (4:2:0, as most photos)."""
  folder = tmp_path / "a"
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(n):
    path = str(folder / f"{i}.jpg")
    with open(path, "wb") as f:
      f.write(jpeg_bytes(photo(*shape, seed=i)))
    paths.append(os.fsencode(path))
  return sources.ImageFiles(np.array(paths), np.zeros(n, np.int32), ("a",))


def config_for(recipe="byol_asymmetric", colour=True, flip=True, **overrides):
  c = tiny_config(**overrides)
  c.model.image_size = SIZE
  if recipe == "dino_multicrop":
    c.aug = recipes.dino_multicrop(image_size=SIZE, local_crops=3, local_size=16)
  else:
    c.aug = getattr(recipes, recipe)(image_size=SIZE)
  if not colour:
    c.aug = plain(c.aug)
  c.aug.flip = flip
  return c


def host_batch(source, config, batch=8, start_step=0, windows=0, local_crops_by_step=None):
  ds = pipeline.train_dataset(source, config, pipeline.HostShard(0, 1, batch), start_step,
                              windows=windows, local_crops_by_step=local_crops_by_step)
  return next(ds.as_numpy_iterator())


def device_views_of(windows_batch, config):
  keys = device_views.view_keys(int(config.seed), windows_batch["position"],
                                windows_batch["host"])
  return jax.device_get(device_views.views_from_windows(
      windows_batch["window"], windows_batch["boxes"], keys, SIZE, config.aug,
      windows_batch["local_used"]))


@pytest.mark.parametrize("recipe", ["byol_asymmetric", "dino_multicrop"])
def test_views_from_windows_are_the_host_views_without_the_random_colours(tmp_path, recipe):
  """Crop + resize from the window at the host's boxes = the host's crop + resize: same boxes
  (an off-by-one box would move every pixel), same filter (to float rounding)."""
  source = image_files(tmp_path)
  config = config_for(recipe, colour=False, flip=False)
  host = host_batch(source, config)
  windows = host_batch(source, config, windows=256)
  assert windows["window"].shape == (8, 256, 256, 3) and windows["window"].dtype == np.uint8
  assert windows["boxes"].shape == (8, 2 + config.aug.local_crops, 4)
  got = device_views_of(windows, config)
  pairs = list(zip(host["views"], got["views"]))
  if config.aug.local_crops:
    pairs += list(zip(host["local_views"], got["local_views"]))
  for want, made in pairs:
    assert made.shape == want.shape and made.dtype == np.uint8
    diff = np.abs(made.astype(int) - want)
    assert diff.max() <= 1, diff.max()
    assert np.mean(diff == 0) > 0.95


def test_a_window_larger_than_window_size_is_shrunk_with_its_boxes(tmp_path):
  source = image_files(tmp_path, shape=(150, 200))
  config = config_for(colour=False, flip=False)
  host = host_batch(source, config)
  small = host_batch(source, config, windows=96)     # most windows span more than 96 px
  exact = host_batch(source, config, windows=256)
  assert small["window"].shape == (8, 96, 96, 3)
  assert (small["boxes"] <= exact["boxes"] + 1e-4).all()
  assert (small["boxes"][..., 0] + small["boxes"][..., 2] <= 96 + 1e-3).all()
  assert (small["boxes"][..., 1] + small["boxes"][..., 3] <= 96 + 1e-3).all()
  assert (small["boxes"] < exact["boxes"] - 1).any()   # some were shrunk
  got = device_views_of(small, config)
  for want, made in zip(host["views"], got["views"]):
    diff = np.abs(made.astype(int) - want)
    assert diff.mean() < 3.0, diff.mean()     # resized twice: close, not equal


@pytest.mark.parametrize("recipe", ["byol_asymmetric", "dino_multicrop"])
def test_the_padding_of_a_shrunk_window_never_reaches_a_view(tmp_path, recipe):
  """Flat grey images, windows shrunk to 96 px and padded with zeros: a box whose end lands an
  ulp past the shrunk window (float scaling) must not pull padding into its edge pixels."""
  folder = tmp_path / "a"
  os.makedirs(folder)
  paths = []
  for i in range(16):
    path = str(folder / f"{i}.jpg")
    with open(path, "wb") as f:
      f.write(jpeg_bytes(np.full((300, 400, 3) if i % 2 else (400, 300, 3), 200, np.uint8)))
    paths.append(os.fsencode(path))
  source = sources.ImageFiles(np.array(paths), np.zeros(16, np.int32), ("a",))
  config = config_for(recipe, colour=False, flip=False)
  made = device_views_of(host_batch(source, config, batch=16, windows=96), config)
  for view in made["views"] + made.get("local_views", ()):
    assert view.min() >= 198 and view.max() <= 202, (view.min(), view.max())


def test_window_size_below_the_view_size_is_refused():
  from vit_accel.errors import UserError
  config = config_for(**{"data.augment_on": "device", "data.source": "image_folder",
                         "data.window_size": 32})
  with pytest.raises(UserError, match="data.window_size=32 is smaller than the views"):
    config_checks.validate_config(config)


def test_windows_carry_the_stream_positions_host_and_local_crops(tmp_path):
  source = image_files(tmp_path)
  config = config_for("dino_multicrop")
  shard = pipeline.HostShard(0, 1, 4)
  ds = pipeline.train_dataset(source, config, shard, start_step=2, windows=128,
                              local_crops_by_step=((3, 1), (10, 3)))
  first, second = [b for _, b in zip(range(2), ds.as_numpy_iterator())]
  for step, b in ((2, first), (3, second)):
    positions = b["position"][:, 0].astype(np.int64) * 2**32 + b["position"][:, 1]
    np.testing.assert_array_equal(positions, step * 4 + np.arange(4))
    np.testing.assert_array_equal(b["host"], 0)
    np.testing.assert_array_equal(b["local_used"], 1 if step < 3 else 3)
  made = device_views_of(first, config)
  assert made["local_views"][0].any() and not any(v.any() for v in made["local_views"][1:])


def test_high_stream_positions_split_into_words(tmp_path):
  position = tf.constant(3 * 2**32 + 7, tf.int64)
  out = pipeline._example_views(views.jpeg(tf.constant(jpeg_bytes(photo(40, 50, 0)))), position,
                                config_for(), 0, None, 64)
  np.testing.assert_array_equal(out["position"].numpy(), [3, 7])


def window_stream(source, config, batch=8, start_step=0):
  mesh = sharding.make_mesh(config)
  return streams.global_batches(source, config, pipeline.HostShard(0, 1, batch), mesh, start_step)


def test_device_stream_from_a_file_source_is_global_views_and_replays_on_resume(tmp_path):
  source = image_files(tmp_path)
  config = config_for(**{"data.augment_on": "device", "data.window_size": 160})
  config_checks.validate_config(config)
  full = [jax.device_get(b) for _, b in zip(range(4), window_stream(source, config))]
  resumed = [jax.device_get(b) for _, b in zip(range(2), window_stream(source, config,
                                                                         start_step=2))]
  batch = next(window_stream(source, config))
  assert isinstance(batch["views"][0], jax.Array)
  assert batch["views"][0].shape == (8, SIZE, SIZE, 3) and batch["views"][0].dtype == np.uint8
  for x, y in zip(full[2:], resumed):
    for a, b in zip(x["views"], y["views"]):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(full[0]["views"][0], full[0]["views"][1])
  assert not np.array_equal(full[0]["views"][0], full[1]["views"][0])


def test_views_from_windows_checks_the_box_count():
  config = config_for()
  with pytest.raises(ValueError, match="3 boxes"):
    device_views.views_from_windows(np.zeros((1, 32, 32, 3), np.uint8),
                                    np.zeros((1, 3, 4), np.float32),
                                    device_views.view_keys(0, np.zeros((1, 2), np.uint32),
                                                           np.zeros(1, np.int32)),
                                    SIZE, config.aug)


@pytest.mark.slow
def test_main_trains_an_image_folder_with_views_made_on_the_device(tmp_path):
  """End to end: JPEG and PNG files (grey, RGB, RGBA; the two decode routes) -> windows -> views
  on the device -> training -> final kNN."""
  import json
  import subprocess
  import sys

  from test_sources import make_image_folder
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = make_image_folder(str(tmp_path / "data"), per_class=(12, 4), corrupt=False,
                           empty_test_class=False)
  run = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke", f"--workdir={run}",
       "--config.data.source=image_folder", f"--config.data.dir={data}",
       "--config.data.augment_on=device", "--config.data.window_size=64", "--config.batch_size=8",
       "--config.budget=1500", "--config.tensorboard=False", "--config.eval.final_bank_size=36",
       "--config.eval.final_query_size=12", "--config.eval.bank_size=36",
       "--config.eval.query_size=12"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final kNN top-1" in proc.stdout
  losses = [json.loads(line).get("loss") for line in open(run / "metrics.jsonl")]
  losses = [x for x in losses if x is not None]
  assert losses and all(np.isfinite(x) for x in losses)
