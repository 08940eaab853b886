"""The run's exception types and exit codes (bad input 2, stopped 3, failed write 4), and how a failed
write is recognised and named. Standard library only: main.py reads it before JAX starts."""
from __future__ import annotations

import errno
import os


def first_line(error: BaseException, limit: int = 160) -> str:
  """The first line of an exception's message (at most `limit` characters), or its type name:
  what a one-line report quotes of a library's multi-line error."""
  lines = str(error).strip().splitlines()
  return lines[0][:limit] if lines else type(error).__name__


class UserError(Exception):
  """A problem the user can fix (config, data, workdir). The message names the problem and the fix."""


EXIT_PREEMPTED = 3   # checkpoint saved; re-run the same command to resume


class Preempted(Exception):
  """Raised by the trainer after a SIGTERM / SIGINT stop saved its checkpoint (main.py exits 3)."""

  def __init__(self, step: int, signal_name: str, directory: str):
    super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved in {directory}; "
                     f"re-run the same command to resume")
    self.step = step


EXIT_STORAGE = 4     # writing the run's files failed; the last complete checkpoint is intact


class StorageError(Exception):
  """Writing checkpoints or run files failed mid-run (disk full, quota, I/O error, read-only file
  system). The message names the cause and the last complete checkpoint; main.py prints it as one
  `error:` line and exits 4. Nothing partial is left for a resume to trip on."""


# Causes named in a StorageError, found in an exception chain (errno) or in its message (TensorStore
# reports "RESOURCE_EXHAUSTED: ... No space left on device" as a ValueError).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
                  errno.ENOENT, errno.EFBIG)


# TensorStore's status codes for a write the storage refused.
TENSORSTORE_WRITE_FAILURES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "DATA_LOSS", "UNAVAILABLE")


def os_error(error: BaseException) -> OSError | None:
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen
    seen = seen.__cause__ or seen.__context__
  return None


def is_storage_failure(error: BaseException) -> bool:
  """Whether a save's exception means the storage failed (an OS error in its chain, or TensorStore
  naming one), as opposed to a bug, which is re-raised as it is."""
  text = str(error)
  return (os_error(error) is not None or any(code in text for code in TENSORSTORE_WRITE_FAILURES)
          or any(os.strerror(code) in text for code in STORAGE_ERRNOS))


def storage_cause(error: BaseException) -> str:
  """A short human cause of a failed write: the OS error's text when one is in the exception chain
  or named in its message, else the first line of the message (at most 160 characters)."""
  chained = os_error(error)
  if chained is not None:
    return os.strerror(chained.errno)
  for code in STORAGE_ERRNOS:
    if os.strerror(code) in str(error):
      return os.strerror(code)
  return first_line(error)
