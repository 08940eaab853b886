"""Data sources. Each returns uint8 images [N, S, S, C] and int32 labels [N] held in host memory.

The embedded default is Fashion-MNIST (70k real, labelled 28x28 grey images, MIT licence) from
Debian's `dataset-fashion-mnist` package. Images are zero-padded 28 -> 32 (2 px each side): the
garments sit on a black background, so padding is lossless and keeps pixels un-resampled, and 32 is
tiled by patch sizes 2, 4, 8, 16. Labels are used only for evaluation.
"""
from __future__ import annotations

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


def check_source(config) -> None:
  """Cheap existence checks for the configured source, run before the heavy imports."""
  source = config.data.source
  if source == "fashion_mnist":
    check_fashion_mnist(config.data.dir or FASHION_MNIST_DEFAULT_DIR)
  else:
    raise UserError(f"unknown data.source={source!r}; available: fashion_mnist")


def load(config, split: str):
  """Dispatch on `config.data.source`. Returns (images, labels) for `split` ('train' | 'test')."""
  check_source(config)
  if config.data.source == "fashion_mnist":
    return load_fashion_mnist(config.data.dir or FASHION_MNIST_DEFAULT_DIR, split)
  raise AssertionError("unreachable")
