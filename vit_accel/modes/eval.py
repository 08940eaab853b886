"""--mode=eval: kNN + linear probe of a saved checkpoint of the run in WORKDIR.

The checkpoint `eval.checkpoint_step` (-1 = the latest) in WORKDIR/checkpoints, evaluated at the
final evaluation sizes; the result is appended to WORKDIR/metrics.jsonl as an `eval` line with
`evaluated_by: "mode=eval"` (the training curves in reports and time-to-accuracy leave those out).
"""
from __future__ import annotations

import jax
from absl import logging

from vit_accel import distributed, run_setup
from vit_accel.checkpointing import restore_checkpoint
from vit_accel.evaluator import Evaluator
from vit_accel.metric_writer import MetricWriter
from vit_accel.modes import Args, save_config
from vit_accel.state import eval_params


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
