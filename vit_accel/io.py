"""The run directory on disk: checked writable before anything starts; small files written
atomically.

Standard library only: main.py calls `check_workdir` before JAX or TensorFlow are imported, so a bad
--workdir fails in a second with one line.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile

from vit_accel.errors import UserError


def _reason(error: OSError) -> str:
  return error.strerror or os.strerror(error.errno or errno.EIO)


def check_workdir(path: str) -> None:
  """Raises UserError (one line) unless `path` is, or can be created as, a directory we can write.

  Creates nothing that stays: the existing directory (or, when `path` does not exist yet, its
  nearest existing ancestor, where it will be created) gets a probe file that is removed at once.
  Catches a path under a regular file, a read-only mount, a missing permission, a full disk.
  """
  path = os.path.abspath(os.path.expanduser(path))
  probe_dir = path
  while not os.path.lexists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  if os.path.islink(probe_dir) and not os.path.exists(probe_dir):
    raise UserError(f"--workdir={path}: {probe_dir} is a broken symbolic link; fix or remove it")
  if not os.path.isdir(probe_dir):
    what = "is a file, not a directory" if probe_dir == path else f"is under {probe_dir}, a file"
    raise UserError(f"--workdir={path} {what}; choose a directory path")
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=probe_dir)
    try:
      os.write(fd, b"ok")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    where = "" if probe_dir == path else f" (cannot create it in {probe_dir})"
    raise UserError(f"--workdir={path} is not writable{where}: {_reason(e)}; choose a writable "
                    f"directory") from None


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader (or a crash) sees the old file or the new one, never
  a half-written one: write a temporary file beside it, fsync, rename over. Raises OSError."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
  try:
    os.fchmod(fd, 0o644)   # as open() would make it (mkstemp's 0600 would hide it from others)
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj, *, indent: int | None = 1) -> None:
  """`obj` as JSON (json.dumps, `indent`), written atomically (atomic_write_text). Raises OSError,
  or TypeError for an object JSON cannot hold."""
  atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
