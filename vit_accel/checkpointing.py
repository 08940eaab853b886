"""Orbax CheckpointManager wrapper: async saves of the train state plus a small JSON of run metadata.

Restores always go through an abstract target carrying the *current* mesh's shardings, so a
checkpoint written on one topology restores onto another. Three outcomes are kept apart:
  - unreadable (files truncated or corrupt): reported, moved aside to `<dir>.corrupt/`, and the
    previous checkpoint is used;
  - incompatible (another run, or a config that builds other shapes): one UserError line, nothing
    moved, deleted or overwritten;
  - a failed write (disk full, I/O error): one StorageError line naming the last complete
    checkpoint; the partial one is removed (here, and by the resuming run) so no resume sees it.
"""
from __future__ import annotations

import glob
import os
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging

from vit_accel import errors
from vit_accel.errors import StorageError, UserError, first_line

# WORKDIR/<this>: checkpoints kept at chosen budget fractions (checkpoint.at_progress), for analysis.
MILESTONES = "milestones"


class Checkpointer:

  def __init__(self, directory: str, *, keep: int | None, every_steps: int,
               async_save: bool = True, read_only: bool = False, resumed_from=None):
    """keep: how many of the newest checkpoints to keep (None = all). read_only: for readers
    (--mode=eval, grad_error), which must not create, clean or delete anything in a directory a
    training run may be writing. resumed_from: the Checkpointer a resume reads (for milestones:
    the rolling one), named in a failed write's message; None = this one."""
    self.directory = os.path.abspath(directory)
    self._resumed_from = resumed_from or self
    # No cleanup of other saves' temporary directories: another process may be writing them;
    # Orbax ignores them when listing steps, and a failed write of ours removes its own.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    # A registry, so that a checkpoint's array metadata (shapes, dtypes) can be read on its own.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    # Some fields of the state only (restore_fields: a warm start's weights, not the optimiser's).
    # Added first: the last handler added for an item is the one a checkpoint records as its own.
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add("state", args, ocp.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add("meta", args, ocp.JsonCheckpointHandler)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._write_failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save when `step` is on the interval, or always with force=True.
    Raises StorageError when this save, or the previous async one, failed to write."""
    try:
      return self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore wrap OS errors in their own types
      if not errors.is_storage_failure(e):
        raise
      raise self._write_failure(e) from None

  def restore_meta(self, step: int) -> dict:
    """Only the JSON metadata: cheap, and checked before a state of another shape is touched."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def state_metadata(self, step: int):
    """The saved train state's tree of array metadata (`.shape`, `.dtype` per leaf), read without
    reading the arrays."""
    return self._manager.item_metadata(step)["state"]

  def check_compatible(self, step: int, abstract_state, *, fields: tuple[str, ...] = (),
                       fix: str = "restore that config, or use a new --workdir") -> None:
    """Raises UserError (one line, ending in `fix`) when checkpoint `step` holds a train state of
    another structure, shape or dtype than `abstract_state` - in `fields` (top-level field names)
    only, when given. May raise anything when its metadata cannot be read."""
    saved = self.state_metadata(step)
    if fields:
      saved = _fields(getattr(saved, "tree", saved), fields)
      abstract_state = _fields(abstract_state, fields)
    self._refuse_mismatch(step, saved, abstract_state, fix)

  def _refuse_mismatch(self, step: int, saved_layout, abstract_state,
                       fix: str = "restore that config, or use a new --workdir") -> None:
    problem = state_mismatch(saved_layout, abstract_state)
    if problem:
      raise UserError(f"checkpoint {step} in {self.directory} was written by a config that builds "
                      f"another train state ({problem}); {fix}")

  def restore(self, step: int, abstract_state):
    """(state placed on `abstract_state`'s shardings, meta dict)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_fields(self, step: int, abstract_state, fields: tuple[str, ...]) -> dict:
    """{field: subtree} of checkpoint `step`, for the top-level `fields` of the train state only,
    placed on `abstract_state`'s shardings (Orbax partial restore: the other fields, e.g. the
    optimiser's moments, are neither read nor compared)."""
    item = _fields(abstract_state, fields)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))
    return dict(restored["state"])

  def restore_latest_good(self, abstract_state, check_meta=lambda meta: None):
    """(state, meta) of the newest checkpoint that restores, or None when there is none.

    `check_meta(meta)` runs first and may raise (a checkpoint of another run: nothing is moved);
    then the saved shapes are compared with `abstract_state` (UserError on a mismatch, nothing
    moved). Only a checkpoint whose files fail to read (truncated or corrupted) is reported in one
    line and moved aside to `<directory>.corrupt/<step>` - kept, not deleted - and the previous one
    is tried.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # noqa: BLE001 - any read failure means "unusable", reported below
        self._quarantine(step, e)
        continue
      check_meta(meta)
      try:
        saved_layout = self.state_metadata(step)
      except Exception as e:  # noqa: BLE001
        self._quarantine(step, e)
        continue
      self._refuse_mismatch(step, saved_layout, abstract_state)
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001
        self._quarantine(step, e)
        continue
      return state, meta
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    reason = first_line(error)
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
    """Blocks until a pending async save is on disk; StorageError when it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if not errors.is_storage_failure(e):
        raise
      raise self._write_failure(e) from None

  def close(self) -> None:
    """Waits for a pending save, then releases the manager. After a failed write (already
    reported) it only cleans up: Orbax's writers are broken then, and would raise again."""
    if self._write_failed:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 - the failure was reported once; do not cascade
        pass
      self.remove_unfinished()   # Orbax may create a save's directory in the background, late
      return
    self.wait()
    self._manager.close()

  def last_complete_step(self) -> int | None:
    """The newest checkpoint on disk that finished writing, read from the directory itself (Orbax
    renames a save to its bare step number only once complete), so it works after a failure."""
    try:
      steps = [int(name) for name in os.listdir(self.directory) if name.isdigit()]
    except OSError:
      return None
    return max(steps, default=None)

  def _write_failure(self, error: Exception) -> StorageError:
    """The one-line StorageError for a failed save; removes the partial checkpoint it left."""
    first = not self._write_failed
    self._write_failed = True
    self.remove_unfinished()
    if first:
      logging.warning("checkpoint write failed: %r", error)
    return StorageError(f"writing a checkpoint to {self.directory} failed ({errors.storage_cause(error)});"
                        f" {self._resumed_from.last_complete_text()}; free space or fix the file "
                        f"system, then re-run the same command to resume")

  def remove_unfinished(self) -> None:
    """Deletes unfinished saves (Orbax's temporary directories; never a complete checkpoint): after
    a failed write, and when a training run takes over its directory (a kill mid-save)."""
    if jax.process_index() == 0:
      for partial in glob.glob(os.path.join(self.directory, f"*{TMP_SUFFIX}*")):
        shutil.rmtree(partial, ignore_errors=True)

  def last_complete_text(self) -> str:
    """'the last complete checkpoint is step N in DIR' (or that there is none), for messages."""
    last = self.last_complete_step()
    return (f"the last complete checkpoint is step {last} in {self.directory}" if last is not None
            else f"no complete checkpoint is in {self.directory}")


# Orbax writes a checkpoint under `<step><TMP_SUFFIX>...` and renames it when complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"

def _fields(tree, fields: tuple[str, ...]) -> dict:
  """{name: tree.name} of a dataclass (the TrainState) or mapping (its saved metadata)."""
  get = tree.__getitem__ if isinstance(tree, dict) else lambda name: getattr(tree, name)
  return {name: get(name) for name in fields}


def _layout(tree) -> dict:
  """{path: (shape, dtype name)} of a tree of arrays, ShapeDtypeStructs or Orbax array metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(path, simple=True, separator="."):
          (tuple(leaf.shape), jax.numpy.dtype(leaf.dtype).name)
          for path, leaf in flat if hasattr(leaf, "shape")}


def state_mismatch(saved, abstract_state) -> str | None:
  """None when the saved state's arrays have the paths, shapes and dtypes of `abstract_state`; else
  the first difference, e.g.
  'params.head.fc2.kernel: float32[256,64] saved, float32[256,32] now'."""
  have, want = _layout(saved), _layout(abstract_state)
  fmt = lambda sd: f"{sd[1]}[{','.join(map(str, sd[0]))}]"  # noqa: E731
  for path in sorted(have.keys() | want.keys()):
    if path not in want:
      return f"{path}: saved, but this config has no such parameter"
    if path not in have:
      return f"{path}: this config has it ({fmt(want[path])}), the checkpoint does not"
    if have[path] != want[path]:
      return f"{path}: {fmt(have[path])} saved, {fmt(want[path])} now"
  return None


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shape structs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class NoCheckpoint(UserError):
  """A run directory has no checkpoint at all (a mode with another way on, e.g. a fresh backbone,
  says so)."""


def restore_checkpoint(config, workdir: str, target, *, step_key: str = "eval.checkpoint_step",
                       fields: tuple[str, ...] = (), fix: str | None = None,
                       check_meta=None) -> tuple[int, object, dict]:
  """(step, state, metadata) of the checkpoint the config key `step_key` names (-1 = the latest):
  eval.checkpoint_step (--mode=eval), export.checkpoint_step, finetune.checkpoint_step,
  init.checkpoint_step (a warm start) - in WORKDIR/checkpoints, restored read-only onto `target`'s
  shardings. With `fields` (top-level TrainState field names) only those are compared and read, and
  `state` is {field: subtree}.

  `check_meta(meta)`, when given, sees the checkpoint's metadata (run_identity.run_metadata) first
  and may raise.

  Raises UserError (one line, naming the saved steps) when there is none (NoCheckpoint), the step
  is not saved, it was written by a config of other shapes or it cannot be read; `fix` replaces
  the remedy those lines name (default: for a reader of its own run's checkpoints)."""
  section, name = step_key.split(".")
  ckpt = Checkpointer(f"{workdir}/checkpoints", keep=None, every_steps=1, async_save=False,
                      read_only=True)
  try:
    steps = ckpt.all_steps()
    wanted = int(config[section][name])
    if not steps:
      raise NoCheckpoint(f"no checkpoint in {ckpt.directory}; " + (
          fix or "train first (same --workdir), or point --workdir at a run directory"))
    step = max(steps) if wanted < 0 else wanted
    if step not in steps:
      raise UserError(f"{step_key}={wanted} is not in {ckpt.directory}; saved steps: "
                      f"{', '.join(map(str, sorted(steps)))}")
    try:
      if check_meta is not None:
        check_meta(ckpt.restore_meta(step))
      ckpt.check_compatible(step, target, fields=fields,
                            fix=fix or "restore that config, or use a new --workdir")
      if fields:
        state, meta = ckpt.restore_fields(step, target, fields), ckpt.restore_meta(step)
      else:
        state, meta = ckpt.restore(step, target)
    except UserError:
      raise   # written by a config of other shapes: named as such, not as unreadable
    except Exception as e:  # noqa: BLE001 - any read failure: name it; a reader moves nothing
      reason = first_line(e)
      others = sorted(s for s in steps if s != step)
      raise UserError(f"checkpoint {step} in {ckpt.directory} cannot be read ({reason}); "
                      + (f"choose another with --config.{step_key} (saved: "
                         f"{', '.join(map(str, others))})" if others else
                         fix or "re-run training in this workdir to replace it")) from None
  finally:
    ckpt.close()
  return step, state, meta
