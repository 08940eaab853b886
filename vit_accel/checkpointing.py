"""Orbax CheckpointManager wrapper: async saves of the train state plus a small JSON of run metadata.

Restores always go through an abstract target carrying the *current* mesh's shardings, so a
checkpoint written on one topology restores onto another.
"""
from __future__ import annotations

import os
import shutil

import jax
from absl import logging
import orbax.checkpoint as ocp


# WORKDIR/<this>: checkpoints kept at chosen budget fractions (checkpoint.at_progress), for analysis.
MILESTONES = "milestones"


class Checkpointer:

  def __init__(self, directory: str, *, keep: int | None, every_steps: int,
               async_save: bool = True):
    """keep: how many of the newest checkpoints to keep (None = all)."""
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps),
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save when `step` is on the interval, or always with force=True."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore_meta(self, step: int) -> dict:
    """Only the JSON metadata: cheap, and checked before a state of another shape is touched."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state):
    """(state placed on `abstract_state`'s shardings, meta dict)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_latest_good(self, abstract_state, check_meta=lambda meta: None):
    """(state, meta) of the newest checkpoint that restores, or None when there is none.

    `check_meta(meta)` runs first and may raise (a checkpoint of another run: nothing is moved).
    A checkpoint that fails to read (truncated or corrupted files) is reported in one line and
    moved aside to `<directory>.corrupt/<step>` - kept, not deleted - and the previous one is tried.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # noqa: BLE001 - any read failure means "unusable", reported below
        self._quarantine(step, e)
        continue
      check_meta(meta)
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001
        self._quarantine(step, e)
        continue
      return state, meta
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    target = os.path.join(self.directory + ".corrupt", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    logging.warning("checkpoint %d in %s is unreadable (%s); moved it to %s and falling back to the "
                    "previous one", step, self.directory, reason, target)
    self._manager.reload()
    fallback = "using the previous one" if self.all_steps() else "no earlier one: starting afresh"
    print(f"warning: checkpoint {step} is unreadable ({type(error).__name__}); moved to {target}; "
          f"{fallback}", flush=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shape structs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
