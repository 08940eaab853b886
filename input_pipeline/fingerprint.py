"""A fingerprint of the data a run trains on, saved with its checkpoints (see
vit_accel/run_identity.py): a resumed run must read the same images, or it is refused.

  in memory (Fashion-MNIST)  split sizes + SHA-256 of the pixels and labels
  image folder               split sizes + SHA-256 of the sorted (path under data.dir, byte size,
                             class) list of the files actually used (unreadable ones left out)
  TFDS                       dataset name, split names, split sizes

The folder itself (`data.dir`) may move: paths are taken relative to it.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from input_pipeline import sources


def _files_digest(files: sources.ImageFiles, root: str) -> str:
  root = os.fsencode(os.path.abspath(root))
  digest = hashlib.sha256()
  for path, label in sorted(zip((os.fsencode(p) for p in files.paths), files.labels.tolist())):
    digest.update(os.path.relpath(path, root) + b"\0")
    name = files.class_names[label]   # a folder name may not be valid UTF-8
    digest.update(f"{os.stat(path).st_size}:{name}\n".encode("utf-8", "surrogateescape"))
  return digest.hexdigest()


def fingerprint(config, train, test) -> dict:
  """{name: JSON-able value} describing the train and test sources (sources.InMemory, ImageFiles
  or TfdsSplit) of `config.data`. Deterministic across hosts and invocations; stats every file of
  an image folder once (a second or so per 100k files on a local disk)."""
  out = {"train_examples": int(train.num_examples), "test_examples": int(test.num_examples)}
  if isinstance(train, sources.InMemory):
    digest = hashlib.sha256(np.ascontiguousarray(train.images).tobytes())
    digest.update(np.ascontiguousarray(train.labels).tobytes())
    out["train_sha256"] = digest.hexdigest()
  elif isinstance(train, sources.ImageFiles):
    out["train_files_sha256"] = _files_digest(train, sources.data_dir(config))
  else:
    out["tfds"] = f"{train.name} {train.split}/{test.split}"
  return out
