"""Data sources beyond the embedded default: an image folder (mixed formats, grey / RGB / RGBA,
corrupt and non-image files, an empty class) and a TFDS dataset (mocked: nothing is downloaded)."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from input_pipeline import pipeline, sources
from vit_accel.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "square", "stripes")


def class_image(name: str, rng, size: int, channels: int) -> np.ndarray:
  """A class-dependent pattern with noise, so a kNN on it has something to find."""
  yy, xx = np.mgrid[:size, :size] / size
  pattern = {"circle": ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.1),
             "square": (abs(yy - 0.5) < 0.3) & (abs(xx - 0.5) < 0.3),
             "stripes": (np.floor(xx * 6) % 2 == 0)}[name]
  grey = np.clip(pattern * 200 + rng.normal(30, 20, (size, size)), 0, 255).astype(np.uint8)
  image = np.repeat(grey[..., None], min(channels, 3), axis=-1)
  if channels == 4:
    image = np.concatenate([image, np.full((size, size, 1), 128, np.uint8)], axis=-1)
  return image


def write_image(path: str, image: np.ndarray) -> None:
  encode = tf.io.encode_jpeg if path.endswith(".jpg") else tf.io.encode_png
  tf.io.write_file(path, encode(image))


def make_image_folder(root, per_class=(24, 8), *, corrupt=True, empty_test_class=True):
  """ROOT/{train,test}/<class>/ with PNG and JPEG files of mixed sizes and channel counts, plus
  (optionally) a corrupt PNG, a text file and an empty test class folder."""
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "test"), per_class):
    for c, name in enumerate(CLASSES):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      if split == "test" and empty_test_class and c == 2:
        continue
      for i in range(count):
        channels = (1, 3, 4)[i % 3] if i % 4 else 3  # grey, colour and RGBA mixed in
        ext = ".jpg" if channels == 3 and i % 2 else ".png"
        size = (28, 40, 36)[i % 3]
        write_image(os.path.join(folder, f"{i:03d}{ext}"), class_image(name, rng, size, channels))
  if corrupt:
    with open(os.path.join(root, "train", "circle", "broken.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with open(os.path.join(root, "train", "square", "notes.txt"), "w") as f:
      f.write("labelling notes\n")
  return root


def folder_config(root, **data):
  c = tiny_config()
  with c.unlocked():
    c.data.source = "image_folder"
    c.data.dir = str(root)
    for key, value in data.items():
      c.data[key] = value
  return c


def test_image_folder_index_labels_and_warnings(tmp_path):
  root = make_image_folder(str(tmp_path))
  files, warnings = sources.index_image_folder(root, "train")
  assert files.class_names == CLASSES
  assert files.num_examples == 3 * 24 + 1          # the .txt is left out, the broken .png is not
  assert sorted(set(files.labels.tolist())) == [0, 1, 2]
  assert any("notes.txt" in w for w in warnings)
  test_files, test_warnings = sources.index_image_folder(root, "test")
  assert test_files.num_examples == 2 * 8 and set(test_files.labels.tolist()) == {0, 1}
  assert any("stripes" in w and "no images" in w for w in test_warnings)


def test_unreadable_images_are_skipped_and_counted_or_fail_naming_the_file(tmp_path):
  root = make_image_folder(str(tmp_path))
  kept = pipeline.load_source(folder_config(root), "train")
  assert kept.num_examples == 3 * 24
  assert not any(p.endswith(b"broken.png") for p in kept.paths)
  with pytest.raises(UserError, match=r"broken\.png is not a readable image"):
    pipeline.load_source(folder_config(root, bad_images="fail"), "train")


def test_image_folder_streams_views_and_eval_arrays_of_any_format(tmp_path):
  root = make_image_folder(str(tmp_path), corrupt=False)
  cfg = folder_config(root)
  source = pipeline.load_source(cfg, "train")
  batch = next(pipeline.train_dataset(source, cfg, pipeline.HostShard(0, 1, 16)).as_numpy_iterator())
  for view in batch["views"]:
    assert view.shape == (16, 32, 32, 3) and view.dtype == np.uint8 and view.max() > 100
  images, labels = pipeline.eval_arrays(source, 32, 20, seed=1)
  assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, source.labels[np.sort(
      np.random.default_rng(1).permutation(source.num_examples)[:20])])
  # The same subset again (the evaluator's fixed bank).
  again, _ = pipeline.eval_arrays(source, 32, 20, seed=1)
  np.testing.assert_array_equal(images, again)
  # Streamed in batches (fine-tuning's whole test split): the same examples, in the same order,
  # never more than a batch at once.
  for src in (source, sources.InMemory(images, labels)):
    whole_x, whole_y = pipeline.eval_arrays(src, 32, -1, seed=0)
    chunks = list(pipeline.eval_batches(src, 32, 7))
    assert [len(y) for _, y in chunks] == [7] * (len(whole_y) // 7) + (
        [len(whole_y) % 7] if len(whole_y) % 7 else [])
    np.testing.assert_array_equal(np.concatenate([x for x, _ in chunks]), whole_x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in chunks]), whole_y)


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("no_classes", "has no class folders"),
    ("unknown_test_class", "a class the train split does not have"),
])
def test_bad_image_folder_layouts_fail_in_one_line(tmp_path, layout, message):
  root = str(tmp_path / "data")
  if layout != "missing":
    os.makedirs(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "test"))
  if layout == "unknown_test_class":
    make_image_folder(root, per_class=(2, 2), corrupt=False, empty_test_class=False)
    os.makedirs(os.path.join(root, "test", "zebra"))
  with pytest.raises(UserError, match=message):
    pipeline.load_source(folder_config(root), "test")


@pytest.mark.slow
def test_image_folder_smoke_run_trains_and_evaluates(tmp_path):
  root = make_image_folder(str(tmp_path / "data"), per_class=(40, 10))
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke", f"--workdir={workdir}",
       "--config.data.source=image_folder", f"--config.data.dir={root}",
       "--config.batch_size=16", "--config.budget=400", "--config.tensorboard=False",
       "--config.eval.bank_size=60", "--config.eval.query_size=20",
       "--config.eval.final_bank_size=-1", "--config.eval.final_query_size=-1",
       "--config.eval.batch_size=20"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped 1 of 121 files" in proc.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  final = [l for l in lines if "knn_top1" in l][-1]
  assert final["knn_bank"] == 120 and final["knn_queries"] == 20   # all train and test images
  assert 0.0 <= final["knn_top1"] <= 1.0


def tfds_config(data_dir, **overrides):
  c = tiny_config(**overrides)
  with c.unlocked():
    c.data.source = "tfds"
    c.data.dir = str(data_dir)
    c.data.tfds_name = "imagenet2012"
    c.data.tfds_splits = ml_collections.ConfigDict({"train": "train", "test": "validation"})
    c.data.num_examples = ml_collections.ConfigDict({"train": 64, "test": 32})
    c.data.shuffle_buffer = 16
  return c


def test_tfds_dataset_not_prepared_fails_without_downloading(tmp_path):
  with pytest.raises(UserError, match=r"not prepared in .*tfds build imagenet2012"):
    sources.check_source(tfds_config(tmp_path))
  cfg = tfds_config(tmp_path)
  with cfg.unlocked():
    cfg.data.tfds_name = ""
  with pytest.raises(UserError, match="needs --config.data.tfds_name"):
    sources.check_source(cfg)


def test_tfds_source_streams_host_shards_and_eval_arrays(tmp_path):
  import tensorflow_datasets as tfds
  os.makedirs(tmp_path / "imagenet2012")  # what `tfds build` leaves behind
  cfg = tfds_config(tmp_path)
  with tfds.testing.mock_data(num_examples=64):
    source = sources.load(cfg, "train")
    assert source == sources.TfdsSplit("imagenet2012", str(tmp_path), "train", 64)
    stream = pipeline.train_dataset(source, cfg, pipeline.HostShard(1, 2, 16)).as_numpy_iterator()
    batch = next(stream)
    assert [v.shape for v in batch["views"]] == [(8, 32, 32, 3)] * 2   # 8 = 16 / 2 hosts
    # Same seed and start step -> the same stream; another start step -> another order.
    again = next(pipeline.train_dataset(source, cfg, pipeline.HostShard(1, 2, 16)).as_numpy_iterator())
    np.testing.assert_array_equal(batch["views"][0], again["views"][0])
    resumed = next(pipeline.train_dataset(source, cfg, pipeline.HostShard(1, 2, 16),
                                          start_step=5).as_numpy_iterator())
    assert not np.array_equal(batch["views"][0], resumed["views"][0])
    images, labels = pipeline.eval_arrays(sources.load(cfg, "test"), 32, 10, seed=2)
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (10,) and labels.dtype == np.int32
