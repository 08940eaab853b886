"""vit-accel entry point.

  python main.py --config=configs/fmnist_mocov3.py[:smoke] --workdir=DIR [--config.key=value ...]

--mode (default train) picks what runs on DIR; each mode is one entry of vit_accel/modes/__init__.py
(listed by --help) and one driver module beside it.
Re-running the same command resumes from the latest checkpoint in DIR/checkpoints.
Bad input (config, data, workdir) ends with one line naming the problem and the fix, exit code 2.
SIGTERM / Ctrl-C: the current step finishes, a checkpoint is saved, exit code 3 (re-run to resume).
A write that fails mid-run (disk full, I/O error): one line naming the cause and the last complete
checkpoint, exit code 4 (free space, then re-run to resume).
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from input_pipeline import sources  # numpy only: the data check runs before JAX/TF start
from vit_accel import errors, io, modes, xla_flags  # standard library only: nothing heavy first
from vit_accel.errors import EXIT_PREEMPTED, EXIT_STORAGE, Preempted, StorageError, UserError

config_flags.DEFINE_config_file("config", None, "Recipe: configs/<recipe>.py[:arg].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: metrics.jsonl, checkpoints/, tensorboard/.")
flags.DEFINE_enum("mode", "train", list(modes.MODES), modes.help_text())
flags.DEFINE_list("compare", [], "--mode=report: more run directories to draw beside WORKDIR.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

EXIT_USER_ERROR = 2


class _DropLibraryChatter:
  """Orbax logs every save step by step at INFO: keep only its warnings and errors, each as one
  line (a failed write logs a traceback from every background writer; ours names the cause once)."""

  def filter(self, record) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < 30:
      return False
    record.exc_info, record.exc_text = None, None
    record.msg, record.args = record.getMessage().strip().split("\n")[0][:300], None
    return True


def _quiet_closed_event_loop(unraisable) -> None:
  """After a failed checkpoint write Orbax closes its event loop while TensorStore still completes
  the other writes into it; each completion is an unraisable 'Event loop is closed' with a
  traceback (hundreds of them). Drop exactly those; anything else goes to Python's default hook."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = FLAGS.config
    config.get("objective")  # ml_collections reports a recipe that failed to load only on access
  except OSError as e:
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    print(f"error: cannot load --config: {detail}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  sys.unraisablehook = _quiet_closed_event_loop
  try:
    # The run directory and the data are checked before JAX/TF start: a bad path fails in seconds.
    io.check_workdir(FLAGS.workdir)
    mode = modes.MODES[FLAGS.mode]
    if mode.reads_data:
      sources.check_source(config)
    xla_flags.apply(config)   # before JAX builds a backend: XLA reads XLA_FLAGS then
    logging.info("config:\n%s", config)
    args = modes.Args(compare=tuple(os.path.abspath(d) for d in FLAGS.compare))
    modes.load(FLAGS.mode).run(config, os.path.abspath(FLAGS.workdir), args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except (StorageError, OSError) as e:
    message = str(e)
    if isinstance(e, OSError):   # a file-system failure outside the training loop's own handling
      if e.errno not in errors.STORAGE_ERRNOS:
        raise
      message = (f"{errors.storage_cause(e)}{': ' + str(e.filename) if e.filename else ''}"
                 f"; fix the file system or free space, then re-run the same command")
    print(f"error: {message}", file=sys.stderr, flush=True)
    logging.flush()
    # Orbax's background writers are broken after a failed write; a normal interpreter shutdown
    # makes each of them print a traceback. Everything of ours is closed and flushed by now.
    os._exit(EXIT_STORAGE)


def parse_flags(argv):
  """absl's parser, with config mistakes (unknown key, bad recipe argument, unparsable value) as
  one line and exit code 2 instead of a traceback."""
  try:
    return FLAGS(argv)
  except AttributeError as e:  # ml_collections: an override names a key the recipe lacks
    text = str(e).replace("\\", "")
    key = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    hint = re.search(r"Did you mean .*\?", text)
    message = (f"unknown config key {key[0] if key else text!r} in a --config.<key>=value override; "
               + (hint.group(0) if hint else "check its spelling against the recipe file"))
  except (flags.Error, ValueError, KeyError, TypeError) as e:
    message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
