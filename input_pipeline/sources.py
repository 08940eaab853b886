"""Data sources: what a split holds and where its images come from (NumPy only: no TensorFlow here).

`load(config, split)` returns one of
  InMemory    uint8 images [N, S, S, C] + int32 labels, held in host memory (Fashion-MNIST)
  ImageFiles  paths + labels of an image folder ROOT/<split>/<class>/*; decoded by the pipeline
  TfdsSplit   a prepared TFDS dataset (`data.tfds_name` in `data.dir`), streamed by the pipeline
The input pipeline (pipeline.py) turns any of them into training views and evaluation arrays.

The embedded default is Fashion-MNIST (70k real, labelled 28x28 grey images, MIT licence) from
Debian's `dataset-fashion-mnist` package. Images are zero-padded 28 -> 32 (2 px each side): the
garments sit on a black background, so padding is lossless and keeps pixels un-resampled, and 32 is
tiled by patch sizes 2, 4, 8, 16. Labels are used only for evaluation.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

from vit_accel.errors import UserError

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PAD = 2


def check_fashion_mnist(data_dir: str) -> None:
  """Fail fast (before anything heavy starts) when the files are not there."""
  missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair
             if not os.path.isfile(os.path.join(data_dir, f))]
  if missing:
    raise UserError(
        f"Fashion-MNIST not found in {data_dir} (missing {missing[0]}): install it with "
        f"`apt-get install -y dataset-fashion-mnist` (sudo when not root) or point "
        f"--config.data.dir at a folder holding the four IDX .gz files.")


def read_idx(path: str) -> np.ndarray:
  """Parse an IDX file (gzip'd or raw): magic (0, 0, dtype, ndim), big-endian dims, data."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise UserError(f"cannot read {path}: {e}; reinstall dataset-fashion-mnist or fix "
                    f"--config.data.dir") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise UserError(f"{path} is not an IDX file (bad magic); reinstall dataset-fashion-mnist")
  dtype_code, ndim = data[2], data[3]
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if dtype_code not in dtypes:
    raise UserError(f"{path}: unknown IDX dtype code {dtype_code:#x}")
  dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
  if array.size != int(np.prod(dims)):
    raise UserError(f"{path} is truncated ({array.size} values, header says {dims}); reinstall "
                    f"dataset-fashion-mnist")
  return array.reshape(dims)


def load_fashion_mnist(data_dir: str, split: str):
  """(images uint8 [N, 32, 32, 1], labels int32 [N]) for split 'train' (60k) or 'test' (10k)."""
  check_fashion_mnist(data_dir)
  image_file, label_file = FASHION_MNIST_FILES[split]
  images = read_idx(os.path.join(data_dir, image_file))
  labels = read_idx(os.path.join(data_dir, label_file)).astype(np.int32)
  if images.shape[0] != labels.shape[0]:
    raise UserError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
  p = FASHION_MNIST_PAD
  images = np.pad(images, ((0, 0), (p, p), (p, p)))[..., None]
  return images, labels


@dataclasses.dataclass(frozen=True, eq=False)
class InMemory:
  images: np.ndarray   # uint8 [N, S, S, C]
  labels: np.ndarray   # int32 [N]

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFiles:
  paths: np.ndarray    # str [N]
  labels: np.ndarray   # int32 [N], index into class_names
  class_names: tuple

  @property
  def num_examples(self) -> int:
    return int(self.paths.shape[0])


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  name: str
  data_dir: str
  split: str
  num_examples: int


def as_source(data) -> InMemory | ImageFiles | TfdsSplit:
  """A source, or a bare uint8 image array (tests, tools) wrapped as one with zero labels."""
  if isinstance(data, np.ndarray):
    return InMemory(data, np.zeros(data.shape[0], np.int32))
  return data


# ------------------------------------------------------------------------------ image folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def index_image_folder(root: str, split: str) -> tuple[ImageFiles, list[str]]:
  """ROOT/<split>/<class>/<file> -> ImageFiles (sorted, so every host builds the same index) and
  warnings. Class ids come from the train split's folders, so train and test agree. Files that are
  not images (by extension: notes, .DS_Store) are left out and counted; whether each image decodes
  is checked by the pipeline (pipeline.verify_image_files)."""
  classes = _class_dirs(os.path.join(root, "train"))
  split_dir = os.path.join(root, split)
  class_id = {name: i for i, name in enumerate(classes)}
  paths, labels, warnings, skipped = [], [], [], []
  for name in _class_dirs(split_dir):
    if name not in class_id:
      raise UserError(f"{split_dir}/{name} is a class the train split does not have; "
                      f"add {root}/train/{name} or remove the folder")
    folder = os.path.join(split_dir, name)
    files = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    skipped += [os.path.join(folder, f) for f in files if f not in images]
    if not images:
      warnings.append(f"{folder} holds no images; class {name!r} has no {split} examples")
    paths += [os.path.join(folder, f) for f in images]
    labels += [class_id[name]] * len(images)
  if skipped:
    warnings.append(f"{len(skipped)} non-image file(s) in {split_dir} left out (first: {skipped[0]})")
  if not paths:
    raise UserError(f"no images under {split_dir}/<class>/; expected e.g. "
                    f"{split_dir}/cat/0001.jpg ({', '.join(IMAGE_EXTENSIONS)})")
  return ImageFiles(np.array(paths), np.array(labels, np.int32), tuple(classes)), warnings


def check_image_folder(root: str) -> None:
  if not root:
    raise UserError("data.source=image_folder needs --config.data.dir=ROOT (a folder holding "
                    "train/<class>/* and test/<class>/*)")
  for split in ("train", "test"):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise UserError(f"{split_dir} does not exist; an image folder needs {root}/train/<class>/* "
                      f"and {root}/test/<class>/*")
    if not _class_dirs(split_dir):
      raise UserError(f"{split_dir} has no class folders; put images in {split_dir}/<class>/")


# ---------------------------------------------------------------------------------------- TFDS
def check_tfds(config) -> None:
  """The dataset must already be prepared in data.dir: we never download (runs and tests are
  offline; ImageNet needs its manual download anyway)."""
  name, data_dir = config.data.get("tfds_name", ""), config.data.dir
  if not name:
    raise UserError("data.source=tfds needs --config.data.tfds_name (e.g. imagenet2012, cifar10)")
  if not data_dir:
    raise UserError("data.source=tfds needs --config.data.dir, the TFDS data_dir holding the "
                    "prepared dataset (nothing is downloaded)")
  if not os.path.isdir(os.path.join(os.path.expanduser(data_dir), name.split(":")[0].split("/")[0])):
    raise UserError(f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it once with "
                    f"`tfds build {name.split(':')[0]} --data_dir={data_dir}` (ImageNet: with the "
                    f"manual files in {data_dir}/downloads/manual), then re-run")


def load_tfds(config, split: str) -> TfdsSplit:
  import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only for this source
  data_dir = os.path.expanduser(config.data.dir)
  tfds_split = config.data.get("tfds_splits", {}).get(split, split)
  builder = tfds.builder(config.data.tfds_name, data_dir=data_dir)
  num = int(config.data.get("num_examples", {}).get(split, -1))
  if num <= 0:
    try:
      num = int(builder.info.splits[tfds_split].num_examples)
    except (KeyError, ValueError) as e:
      raise UserError(f"TFDS {config.data.tfds_name!r} in {data_dir} has no split {tfds_split!r} "
                      f"({str(e).splitlines()[0]}); set data.tfds_splits.{split}") from None
  return TfdsSplit(config.data.tfds_name, data_dir, tfds_split, num)


# ------------------------------------------------------------------------------------ dispatch
SOURCES = ("fashion_mnist", "image_folder", "tfds")


def check_source(config) -> None:
  """Cheap existence checks for the configured source, run before the heavy imports."""
  source = config.data.source
  if source == "fashion_mnist":
    check_fashion_mnist(config.data.dir or FASHION_MNIST_DEFAULT_DIR)
  elif source == "image_folder":
    check_image_folder(config.data.dir)
  elif source == "tfds":
    check_tfds(config)
  else:
    raise UserError(f"unknown data.source={source!r}; available: {', '.join(SOURCES)}")


def load(config, split: str) -> InMemory | ImageFiles | TfdsSplit:
  """The `split` ('train' | 'test') of the configured source. Image-folder warnings (empty class
  folders, non-image files) are logged here; unreadable images are the pipeline's to find."""
  check_source(config)
  source = config.data.source
  if source == "fashion_mnist":
    return InMemory(*load_fashion_mnist(config.data.dir or FASHION_MNIST_DEFAULT_DIR, split))
  if source == "image_folder":
    files, warnings = index_image_folder(config.data.dir, split)
    from absl import logging
    for w in warnings:
      logging.warning("%s", w)
    return files
  return load_tfds(config, split)
