"""--mode=finetune: fine-tune a backbone plus a linear head on the labelled train split, report
test top-1 (the recipe: vit_accel/finetune.py).

`finetune.init=checkpoint` (default) starts from the checkpoint `finetune.checkpoint_step` (-1 = the
latest) of the run in WORKDIR, taking the backbone of the weights the objective evaluates (DINO: the
teacher; `eval.weights` picks another copy); `random` starts from a fresh backbone (the config's
seed), the baseline. Each evaluation is appended to WORKDIR/metrics.jsonl as a `finetune` line at
the checkpoint's step (0 for random); the last has `final: true`. Nothing in WORKDIR is changed
besides metrics.jsonl and config.finetune.json.
"""
from __future__ import annotations

import os

import jax
from absl import logging

from vit_accel import checkpointing, distributed, finetune, run_setup
from vit_accel.errors import UserError
from vit_accel.metric_writer import MetricWriter
from vit_accel.modes import Args, save_config
from vit_accel.state import eval_params
from vit_accel.train import use_compilation_cache


def restore_backbone(config, workdir: str, target) -> tuple[int, object]:
  """(step, backbone parameters) of checkpoint finetune.checkpoint_step (-1 = the latest) in
  WORKDIR/checkpoints: the `backbone` subtree of state.eval_params (the objective's evaluation
  weights). UserError (one line) when there is no such checkpoint, or it cannot be read or was
  written by a config of other shapes (checkpointing.restore_checkpoint's checks)."""
  try:
    step, state, _ = checkpointing.restore_checkpoint(config, workdir, target,
                                                      step_key="finetune.checkpoint_step")
  except checkpointing.NoCheckpoint as e:   # this mode has a way on without one
    raise UserError(f"{e}; or fine-tune a fresh backbone with --config.finetune.init=random") \
        from None
  return step, eval_params(config, state)["backbone"]


def run(config, workdir: str, args: Args = Args()) -> dict:
  """The final `finetune` metrics line written (also printed as one summary line)."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  use_compilation_cache(config)
  ft = config.finetune
  # The data first (a bad image folder fails before any checkpoint is read), then every check of
  # the fine-tune's own keys, then the checkpoint: all before anything compiles.
  setup = run_setup.build(config, training=False)
  plan = finetune.make_plan(config, setup.train_source, setup.mesh)
  step, backbone = 0, None
  if ft.init == "checkpoint":
    step, backbone = restore_backbone(config, workdir, setup.restore_target)
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)   # init=random may start in a new directory
  save_config(config, workdir, "finetune", primary=primary)
  logging.info("fine-tune from %s: %d classes, %d steps (%d per epoch) at batch %d", ft.init if
               backbone is None else f"checkpoint {step}", plan.num_classes, plan.total_steps,
               plan.steps_per_epoch, ft.batch_size)
  about = {"init": ft.init, "checkpoint_step": step if backbone is not None else None,
           "epochs": ft.epochs, "batch_size": ft.batch_size, "num_classes": plan.num_classes}
  if backbone is not None and config.eval.weights:
    about["eval_weights"] = config.eval.weights
  writer = MetricWriter(workdir, primary=primary, tensorboard=False)
  try:
    result = finetune.train_and_evaluate(
        config, setup.mesh, setup.train_source, setup.test_source, plan, backbone,
        report=lambda line: writer.write(step, {**about, **line}, kind="finetune"))
  finally:
    writer.close()
  origin = f"checkpoint {step}" if backbone is not None else "a random backbone"
  print(f"fine-tune from {origin}: test top-1 {result['test_top1']:.4f} ({result['test_examples']} "
        f"test images) after {ft.epochs:g} epochs ({result['finetune_steps']} steps at batch "
        f"{ft.batch_size}), train loss {result['train_loss']:.4f}, "
        f"{result['finetune_wall_s']:.0f}s", flush=True)
  return {"step": step, "kind": "finetune", **about, **result}
