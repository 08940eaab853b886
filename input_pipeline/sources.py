"""Data sources: what a split holds and where its images come from (NumPy only: no TensorFlow here).

`load(config, split)` returns one of
  InMemory    uint8 images [N, S, S, C] + int32 labels, held in host memory (Fashion-MNIST)
  ImageFiles  paths + labels of an image folder ROOT/<split>/<class>/** (any depth; class = top
              folder); decoded by the pipeline as Pillow shows them (pipeline.read_image; plain
              JPEGs by TF, crop window only, to the same pixels)
  TfdsSplit   a prepared TFDS dataset (`data.tfds_name` in `data.dir`), streamed by the pipeline
The input pipeline (pipeline.py) turns any of them into training views and evaluation arrays.

The embedded default is Fashion-MNIST (70k real, labelled 28x28 grey images, MIT licence) from
Debian's `dataset-fashion-mnist` package. Images are zero-padded 28 -> 32 (2 px each side): the
garments sit on a black background, so padding is lossless and keeps pixels un-resampled, and 32 is
tiled by patch sizes 2, 4, 8, 16. Labels are used only for evaluation.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import os
import struct

import numpy as np
from absl import logging

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
  paths: np.ndarray    # bytes [N] (numpy 'S'): os.fsencode'd, so non-UTF-8 names round-trip
  labels: np.ndarray   # int32 [N], index into class_names
  class_names: tuple
  # bool [N]: the training views decode this file with TF's JPEG decoder, their crop window only
  # (else Pillow, whole); set by pipeline.verify_image_files; None: not decided yet
  # (pipeline.jpeg_routes decides from the headers)
  jpeg: np.ndarray | None = None

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
# What Pillow (the decoder, pipeline.read_image) opens; compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IMAGE_EXTENSIONS_B = tuple(os.fsencode(e) for e in IMAGE_EXTENSIONS)

# Why an entry of ROOT/<split>/ was left out of the index (the keys are the log's wording).
NON_IMAGE = "non-image file(s)"
HIDDEN = "hidden file(s) or folder(s)"
OUTSIDE_CLASS = "file(s) outside any class folder"
NOT_A_FILE = "special file(s) or broken link(s)"
UNLISTABLE = "folder(s) that cannot be listed"
REVISITED = "folder(s) reached twice through links"


def display_path(path) -> str:
  """A path (str or bytes) as printable text: bytes that are not UTF-8 become \\xNN escapes, so a
  log line or error message can always be written, and still names the file."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def _class_dirs(split_dir) -> list[bytes]:
  """The class folder names (bytes, sorted bytewise) of a split folder: its non-hidden folders."""
  with os.scandir(os.fsencode(split_dir)) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith(b"."))


def _files_under(folder: bytes, left_out: dict) -> list[bytes]:
  """Every non-hidden file under `folder` at any depth (links followed), sorted bytewise; what is
  passed over is appended to left_out[reason]."""
  found, seen, pending = [], set(), [folder]
  while pending:
    current = pending.pop()
    try:
      stat = os.stat(current)
      with os.scandir(current) as it:
        entries = list(it)
    except OSError:
      left_out[UNLISTABLE].append(current)
      continue
    if (stat.st_dev, stat.st_ino) in seen:  # a link back up the tree (or a second way in)
      left_out[REVISITED].append(current)
      continue
    seen.add((stat.st_dev, stat.st_ino))
    for e in entries:
      if e.name.startswith(b"."):  # .DS_Store, .ipynb_checkpoints/, .git/ ...
        left_out[HIDDEN].append(e.path)
      elif e.is_dir():
        pending.append(e.path)
      elif e.is_file():
        found.append(e.path)
      else:
        left_out[NOT_A_FILE].append(e.path)
  # Bytewise order of whole paths: the same on every host, whatever the locale or listing order.
  return sorted(found)


def index_image_folder(root: str, split: str) -> tuple[ImageFiles, list[str]]:
  """Index ROOT/<split>/<class>/**: every image file at any depth under a class folder.

  Args:
    root: the image-folder root (str or bytes), holding train/<class>/ and test/<class>/.
    split: 'train' or 'test'.

  Returns:
    (ImageFiles, warnings). ImageFiles.paths: bytes array [N] (numpy 'S', os.fsencode'd paths, so
    names that are not valid UTF-8 round-trip), grouped by class, sorted bytewise within a class,
    so every host builds the same index; labels: int32 [N]; class_names: the train split's top
    folders (str, os.fsdecode'd) in bytewise order, so train and test agree. A file's class is the
    top folder under the split, however deep the file sits. warnings: log lines (str), one per
    reason something was left out, with its count and first example: non-image extensions, hidden
    files and folders (leading '.'), files directly in ROOT/<split>/, special files or broken
    links, folders that cannot be listed or are reached twice through links, and class folders
    holding no images. Whether each image decodes is checked later (pipeline.verify_image_files).

  Raises:
    UserError: the split has a class folder the train split lacks, or holds no image files.
    OSError: ROOT/<split> or ROOT/train cannot be listed (check_image_folder catches the usual
      cases first).
  """
  root_b = os.fsencode(root)
  classes = _class_dirs(os.path.join(root_b, b"train"))
  split_dir = os.path.join(root_b, os.fsencode(split))
  class_id = {name: i for i, name in enumerate(classes)}
  left_out = collections.defaultdict(list)
  paths, labels, warnings = [], [], []
  with os.scandir(split_dir) as entries:
    for e in sorted(entries, key=lambda e: e.name):
      if e.name.startswith(b"."):
        left_out[HIDDEN].append(e.path)
      elif not e.is_dir():
        left_out[OUTSIDE_CLASS if e.is_file() else NOT_A_FILE].append(e.path)
  for name in _class_dirs(split_dir):
    folder = os.path.join(split_dir, name)
    if name not in class_id:
      raise UserError(f"{display_path(folder)} is a class the train split does not have; "
                      f"add {display_path(os.path.join(root_b, b'train', name))} or remove the "
                      f"folder")
    files = _files_under(folder, left_out)
    images = [f for f in files if f.lower().endswith(_IMAGE_EXTENSIONS_B)]
    left_out[NON_IMAGE] += [f for f in files if not f.lower().endswith(_IMAGE_EXTENSIONS_B)]
    if not images:
      warnings.append(f"{display_path(folder)} holds no images; class "
                      f"{os.fsdecode(name)!r} has no {split} examples")
    paths += images
    labels += [class_id[name]] * len(images)
  for reason, skipped in left_out.items():
    if skipped:
      warnings.append(f"{len(skipped)} {reason} in {display_path(split_dir)} left out (first: "
                      f"{display_path(sorted(skipped)[0])})")
  if not paths:
    raise UserError(f"no images under {display_path(split_dir)}/<class>/; expected e.g. "
                    f"{display_path(split_dir)}/cat/0001.jpg ({', '.join(IMAGE_EXTENSIONS)})")
  class_names = tuple(os.fsdecode(c) for c in classes)
  return ImageFiles(np.array(paths, dtype=np.bytes_), np.array(labels, np.int32), class_names), \
      warnings


def check_image_folder(root: str) -> None:
  """Cheap layout checks before anything heavy starts. Raises UserError: no root given, a missing
  ROOT/train or ROOT/test, or one without class folders."""
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
  name, data_dir = config.data.tfds_name, config.data.dir   # as typed, for messages
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
  from input_pipeline import tf_runtime
  tf_runtime.load()   # TF configured (accelerators hidden) before TFDS imports it
  import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only for this source
  directory = data_dir(config)
  tfds_split = config.data.tfds_splits[split]
  builder = tfds.builder(config.data.tfds_name, data_dir=directory)
  num = int(config.data.num_examples[split])
  if num <= 0:
    try:
      num = int(builder.info.splits[tfds_split].num_examples)
    except (KeyError, ValueError) as e:
      raise UserError(f"TFDS {config.data.tfds_name!r} in {directory} has no split {tfds_split!r} "
                      f"({str(e).splitlines()[0]}); set data.tfds_splits.{split}") from None
  return TfdsSplit(config.data.tfds_name, directory, tfds_split, num)


# ------------------------------------------------------------------------------------ dispatch
def data_dir(config) -> str:
  """`data.dir` with `~` expanded ("" stays "": the source's default)."""
  return os.path.expanduser(config.data.dir) if config.data.dir else ""


SOURCES = ("fashion_mnist", "image_folder", "tfds")


def check_source(config) -> None:
  """Cheap existence checks for the configured source, run before the heavy imports."""
  source = config.data.source
  if source == "fashion_mnist":
    check_fashion_mnist(data_dir(config) or FASHION_MNIST_DEFAULT_DIR)
  elif source == "image_folder":
    check_image_folder(data_dir(config))
  elif source == "tfds":
    check_tfds(config)
  else:
    raise UserError(f"unknown data.source={source!r}; available: {', '.join(SOURCES)}")


def load(config, split: str) -> InMemory | ImageFiles | TfdsSplit:
  """The `split` ('train' | 'test') of the configured source. Image-folder warnings (what was left
  out, by reason, and empty class folders) are logged here; unreadable images are the pipeline's
  to find (pipeline.load_source). Raises UserError for a missing or malformed source."""
  check_source(config)
  source = config.data.source
  if source == "fashion_mnist":
    return InMemory(*load_fashion_mnist(data_dir(config) or FASHION_MNIST_DEFAULT_DIR, split))
  if source == "image_folder":
    files, warnings = index_image_folder(data_dir(config), split)
    for w in warnings:
      logging.warning("%s", w)
    return files
  return load_tfds(config, split)
