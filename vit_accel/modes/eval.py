"""--mode=eval: kNN + linear probe of a saved checkpoint of the run in WORKDIR.

The checkpoint `eval.checkpoint_step` (-1 = the latest) in WORKDIR/checkpoints, evaluated at the
final evaluation sizes; the result is appended to WORKDIR/metrics.jsonl as an `eval` line with
`evaluated_by: "mode=eval"` (the training curves in reports and time-to-accuracy leave those out).
"""
from __future__ import annotations

import jax
from absl import logging

from vit_accel import checkpointing, distributed, run_setup
from vit_accel.errors import UserError, first_line
from vit_accel.evaluator import Evaluator
from vit_accel.metric_writer import MetricWriter
from vit_accel.modes import Args, save_config
from vit_accel.state import eval_params


class NoCheckpoint(UserError):
  """WORKDIR has no checkpoint at all (a mode with another way on, e.g. a fresh backbone, says so)."""


def restore_checkpoint(config, workdir: str, target, *,
                       step_key: str = "eval.checkpoint_step") -> tuple[int, object, dict]:
  """(step, state, metadata) of the checkpoint the config key `step_key` names (-1 = the latest;
  --mode=export passes export.checkpoint_step) in WORKDIR/checkpoints, restored read-only into
  `target`. UserError (naming the saved steps) when there is none, it is not saved, it was written
  by a config of other shapes or cannot be read."""
  section, name = step_key.split(".")
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=config.checkpoint.keep,
                                    every_steps=config.checkpoint.every_steps, async_save=False,
                                    read_only=True)
  try:
    steps = ckpt.all_steps()
    wanted = int(config[section][name])
    if not steps:
      raise NoCheckpoint(f"no checkpoint in {ckpt.directory}; train first (same --workdir), or point "
                      f"--workdir at a run directory")
    step = max(steps) if wanted < 0 else wanted
    if step not in steps:
      raise UserError(f"{step_key}={wanted} is not in {ckpt.directory}; saved steps: "
                      f"{', '.join(map(str, sorted(steps)))}")
    try:
      ckpt.check_compatible(step, target)
      state, meta = ckpt.restore(step, target)
    except UserError:
      raise   # written by a config of other shapes: named as such, not as unreadable
    except Exception as e:  # noqa: BLE001 - any read failure: name it; eval moves nothing
      reason = first_line(e)
      others = sorted(s for s in steps if s != step)
      raise UserError(f"checkpoint {step} in {ckpt.directory} cannot be read ({reason}); "
                      + (f"choose another with --config.{step_key} (saved: "
                         f"{', '.join(map(str, others))})" if others else
                         "re-run training in this workdir to replace it")) from None
  finally:
    ckpt.close()
  return step, state, meta


def run(config, workdir: str, args: Args = Args()) -> dict:
  """The metrics line written (the evaluation, the checkpoint's step and clocks)."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  # The data first (run_setup.build reads the sources): a bad image folder is reported before any
  # checkpoint is touched.
  setup = run_setup.build(config, training=False)   # any device count evaluates
  step, state, meta = restore_checkpoint(config, workdir, setup.restore_target)
  save_config(config, workdir, "eval", primary=jax.process_index() == 0)
  evaluator = Evaluator(config, setup.model, setup.mesh, setup.state_shardings,
                        setup.train_source, setup.test_source)
  result = evaluator(eval_params(config, state), final=True)
  line = {**result, "evaluated_by": "mode=eval", "checkpoint_step": step}
  weights = config.eval.weights   # "" = the objective's own choice
  if weights:
    line["eval_weights"] = weights
  if "wall_s" in meta:  # when the checkpoint was written, in the run's own clock
    line["wall_s"] = meta["wall_s"]
    line["train_wall_s"] = meta["wall_s"] - meta.get("eval_wall_s", 0.0)
  writer = MetricWriter(workdir, primary=jax.process_index() == 0, tensorboard=False)
  writer.write(step, line, kind="eval")
  writer.close()
  logging.info("checkpoint %d: %s", step, line)
  which = f" ({weights} weights)" if weights else ""
  print(f"checkpoint {step}{which}: kNN top-1 {result['knn_top1']:.4f}, linear probe "
        f"({result['linear_probe']}) top-1 {result['linear_top1']:.4f} (bank/probe-train "
        f"{result['knn_bank']}, queries {result['knn_queries']}, {result['eval_s']:.0f}s)",
        flush=True)
  return line
