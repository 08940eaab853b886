"""The `--mode`s of main.py: one registry entry and one driver module per mode.

A driver (`vit_accel/modes/<name>.py`) exposes `run(config, workdir, args=Args())` and is thin: it
builds the run where it needs a model or state (run_setup.build), calls the maths (grad_error,
cost_table, schedule_search, evaluator, report, the trainer) and writes its files through
vit_accel.io. main.py checks the workdir and the data source (`reads_data`) before it loads the
driver; drivers that use JAX start its multi-process runtime first (distributed.initialize).

Standard library only, like io.py: main.py reads the registry before JAX or TensorFlow is imported.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

from vit_accel import io


@dataclasses.dataclass(frozen=True)
class Mode:
  module: str                 # the driver: a module with run(config, workdir, args)
  reads_data: bool            # main checks the data source first (a bad path fails in seconds)
  help: str                   # one line for --help
  # The file in WORKDIR recording the config the mode ran with, None = none. Drivers write it with
  # save_config once their inputs are checked; train's config.json (the run's own record) is written
  # by the trainer once the run's identity is checked. Analysis modes on a run directory record
  # theirs beside it, never over it.
  config_record: str | None = None


@dataclasses.dataclass(frozen=True)
class Args:
  """Command-line inputs of a mode besides the config and the workdir."""
  compare: tuple[str, ...] = ()   # --mode=report: more run directories (absolute paths)


MODES = {
    "train": Mode("vit_accel.modes.train", reads_data=True,
                  config_record="config.json",
                  help="pretrain (or resume) in WORKDIR"),
    "eval": Mode("vit_accel.modes.eval", reads_data=True,
                 config_record="config.eval.json",
                 help="kNN + linear probe of a checkpoint in WORKDIR, appended to "
                      "WORKDIR/metrics.jsonl"),
    "cost": Mode("vit_accel.modes.cost", reads_data=False,
                 config_record="config.cost.json",
                 help="time the train step per compression strategy -> WORKDIR/cost_table.json"),
    "grad_error": Mode("vit_accel.modes.grad_error", reads_data=True,
                       config_record="config.grad_error.json",
                       help="gradient bias/variance/CA-MSE per strategy at WORKDIR's checkpoints "
                            "-> WORKDIR/grad_error.json"),
    "search": Mode("vit_accel.modes.search", reads_data=False,
                   help="a schedule from WORKDIR/grad_error.json -> WORKDIR/schedule.txt"),
    "pilot": Mode("vit_accel.modes.pilot", reads_data=True,
                  config_record="config.pilot.json",
                  help="short uncompressed run + grad_error + search in one go"),
    "report": Mode("vit_accel.modes.report", reads_data=False,
                   help="plots and a table of WORKDIR (and --compare runs) into WORKDIR/report/"),
    "export": Mode("vit_accel.modes.export", reads_data=False,
                   config_record="config.export.json",
                   help="the backbone of a checkpoint in WORKDIR for timm / PyTorch and Flax "
                        "-> WORKDIR/export/step_<N>/"),
    "finetune": Mode("vit_accel.modes.finetune", reads_data=True,
                     config_record="config.finetune.json",
                     help="fine-tune a checkpoint's backbone (or a random one) + a linear head on "
                          "the train split; test top-1 appended to WORKDIR/metrics.jsonl"),
}


def help_text() -> str:
  return "; ".join(f"{name}: {mode.help}" for name, mode in MODES.items()) + "."


def load(name: str):
  """The driver module of mode `name`."""
  # A deliberate lazy import: only the chosen mode's module (and what it imports) is loaded, so
  # --mode=report and --mode=search never import JAX or TensorFlow, and --mode=cost never
  # TensorFlow.
  return importlib.import_module(MODES[name].module)


def save_config(config, workdir: str, name: str, *, primary: bool) -> None:
  """Records `config` as WORKDIR/<MODES[name].config_record> (JSON, atomic) when `primary` (process 0
  of a multi-process run). Drivers call it once their inputs are checked, so a bad command leaves a
  run directory untouched. Raises OSError when the write fails."""
  record = MODES[name].config_record
  if record and primary:
    io.atomic_write_text(os.path.join(workdir, record), config.to_json_best_effort(indent=1) + "\n")
