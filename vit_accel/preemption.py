"""Stop requests (SIGTERM from a preempting scheduler, SIGINT from Ctrl-C) turned into a clean stop:
the loop finishes its step, every host agrees on the step, a checkpoint is saved and the process exits
with errors.EXIT_PREEMPTED (3). A second Ctrl-C interrupts at once (the last checkpoint still stands).
"""
from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
  """Installs SIGTERM / SIGINT handlers for the duration of a run (`with StopRequest(...)`)."""

  def __init__(self, check_every_steps: int = 10):
    self.check_every_steps = max(1, check_every_steps)
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals to the caller
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):
    if self.signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # impatient second Ctrl-C
    self.signal = signum
    logging.warning("received %s: stopping after this step with a checkpoint",
                    signal.Signals(signum).name)

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signal).name if self.signal else ""

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`. Single process: as soon as a signal arrived. Several processes:
    checked every `check_every_steps` steps, and true on every host if any host was signalled, so all
    save the same step."""
    if jax.process_count() == 1:
      return self.signal is not None
    if step % self.check_every_steps:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    if np.any(flags) and self.signal is None:
      self.signal = signal.SIGTERM  # another host was preempted
    return bool(np.any(flags))
