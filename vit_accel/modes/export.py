"""--mode=export: the backbone of a saved checkpoint of the run in WORKDIR, for timm / PyTorch and
Flax users.

The checkpoint `export.checkpoint_step` (-1 = the latest) in WORKDIR/checkpoints; the weights
evaluation reads (state.eval_params: the objective's choice, DINO's EMA teacher, or the copy
`eval.weights` names); written by vit_accel.export into `export.dir` ("" = WORKDIR/export) as
step_<N>/ (step_<N>_patch<P>/ at `export.patch_size=P`, with a `_<weights>` suffix when
`eval.weights` is set): model.safetensors, config.json, flax_params.msgpack. Reads no data.
"""
from __future__ import annotations

import json
import os

import jax
from absl import logging

from vit_accel import distributed, objectives, run_setup
from vit_accel import export as export_lib
from vit_accel import sharding as sharding_lib
from vit_accel.checkpointing import restore_checkpoint
from vit_accel.errors import UserError
from vit_accel.modes import Args, save_config
from vit_accel.state import EVAL_WEIGHTS, eval_params


def export_directory(config, workdir: str, step: int) -> str:
  """Where the export of checkpoint `step` goes: <export.dir or WORKDIR/export>/step_<N>[_patch<P>]
  [_<eval.weights>] (absolute)."""
  root = os.path.expanduser(config.export.dir or os.path.join(workdir, "export"))
  name = f"step_{step}"
  patch = int(config.export.patch_size)
  if patch and patch != config.model.patch_size:
    name += f"_patch{patch}"
  if config.eval.weights:
    name += f"_{config.eval.weights}"
  return os.path.abspath(os.path.join(root, name))


def check_writable(root: str) -> None:
  """Raises UserError (one line) unless `root` (export.dir) is, or can be created as, a directory
  this process may write into. Creates nothing."""
  probe = root
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    where = "is a file" if probe == root else f"is under {probe}, a file"
    raise UserError(f"export.dir={root} {where}; choose a directory path")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"export.dir={root} is not writable ({probe}); choose a writable directory")


def check_replaceable(directory: str, workdir: str) -> None:
  """Raises UserError (one line) when `directory` holds an export of another run than `workdir`'s
  (a shared export.dir): re-exporting the same run's checkpoint replaces it, another run's is never
  replaced. An unreadable config.json counts as another run's."""
  config_path = os.path.join(directory, export_lib.CONFIG_FILE)
  if not os.path.lexists(directory):
    return
  try:
    with open(config_path) as f:
      source = json.load(f)["source"]["workdir"]
  except (OSError, ValueError, KeyError, TypeError):
    source = None
  if source is None or os.path.realpath(source) != os.path.realpath(workdir):
    raise UserError(f"{directory} holds an export of another run ({source or 'unreadable'}); "
                    f"it is not replaced: set --config.export.dir to another directory")


def run(config, workdir: str, args: Args = Args()) -> dict:
  """{step, directory, files, weights} of the export written. Raises UserError (one line, before
  anything is written) for an export.patch_size that does not tile the image, an export.dir that
  is a file or not writable, a missing or unreadable checkpoint, or a target folder holding
  another run's export."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  # Inputs first: a bad patch size or a missing checkpoint is one line before anything compiles.
  export_lib.check_patch_size(int(config.export.patch_size), config.model.image_size)
  check_writable(os.path.dirname(export_directory(config, workdir, 0)))
  setup = run_setup.build(config, splits=(), training=False)   # no data: any device count
  step, state, _ = restore_checkpoint(config, workdir, setup.restore_target,
                                      step_key="export.checkpoint_step")
  # Which copy (the TrainState field): what eval_params reads, recorded in config.json.
  which = config.eval.weights
  weights = EVAL_WEIGHTS[which] if which else objectives.get(config.objective).EVAL_ON
  backbone = eval_params(config, state)["backbone"]
  # Sharded (FSDP) or multi-host parameters: every process joins the gather; process 0 writes.
  backbone = jax.tree.map(sharding_lib.to_host, backbone)
  patch = int(config.export.patch_size) or config.model.patch_size
  backbone = export_lib.resize_to_patch(backbone, patch, config.model.image_size)
  primary = jax.process_index() == 0
  save_config(config, workdir, "export", primary=primary)
  directory = export_directory(config, workdir, step)
  check_replaceable(directory, workdir)
  source = {"workdir": os.path.abspath(workdir), "checkpoint_step": step, "objective": config.objective,
            "weights": weights}
  meta = export_lib.export_config(model_cfg=config.model, data_cfg=config.data, patch_size=patch,
                                  source=source)
  files = (export_lib.write_export(directory, backbone, meta) if primary else
           [os.path.join(directory, n) for n in (export_lib.SAFETENSORS_FILE,
                                                 export_lib.CONFIG_FILE, export_lib.FLAX_FILE)])
  logging.info("checkpoint %d (%s) exported to %s", step, weights, directory)
  if primary:
    print(f"checkpoint {step} ({config.objective}, {weights} backbone, patch {patch}) exported to "
          f"{directory}: {', '.join(os.path.basename(f) for f in files)}", flush=True)
  return {"step": step, "directory": directory, "files": files, "weights": weights}
