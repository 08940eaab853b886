"""The one exception type for bad user input: main.py prints its message as one line and exits 2."""


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
