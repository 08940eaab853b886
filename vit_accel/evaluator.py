"""Evaluating a backbone: kNN and a linear probe on frozen CLS features, during training and on any
saved checkpoint (`--mode=eval`).

Bank / probe-train set = the train split, queries / probe-test set = the test split, both at full
sequence length (no compression at evaluation). Features are extracted once per evaluation and
shared by the two protocols.
"""
from __future__ import annotations

import time

import jax
from absl import logging

from input_pipeline import pipeline, sources
from vit_accel import checkpointing, evaluation
from vit_accel import sharding as sharding_lib
from vit_accel.errors import UserError, first_line
from vit_accel.metric_writer import MetricWriter
from vit_accel.train_step import (build_model, eval_params, make_optimizer, normalize_images,
                                  state_layout, validate_config)


class Evaluator:
  """kNN top-1 (weighted, k / temperature from config) and linear-probe top-1 (closed-form ridge,
  see evaluation.linear_probe) of backbone CLS features. Call it with `eval_params(config, state)`:
  the trained network, or DINO's teacher."""

  def __init__(self, config, model, mesh, state_shardings, train_split, test_split):
    """train_split / test_split: sources (pipeline.load_source) or bare uint8 image arrays."""
    self.config = config
    self.mesh = mesh
    ev = config.eval
    size = config.model.image_size
    self.size = size
    self.train_split, self.test_split = train_split, test_split
    self._arrays = {}  # (split, limit) -> (uint8 images, labels): decoded once, reused
    # Any device count: the feature batch is eval.batch_size rounded up to a multiple of the devices
    # (the last batch of a split is zero-padded to it anyway), so it never has to divide them.
    self.batch_size = -(-ev.batch_size // mesh.size) * mesh.size

    def feature_fn(params, images):
      return model.apply({"params": params}, normalize_images(images, config), method="features")

    self.feature_fn = jax.jit(feature_fn, in_shardings=(eval_params(config, state_shardings),
                                                        sharding_lib.batch_sharding(mesh)),
                              out_shardings=sharding_lib.batch_sharding(mesh))

  def arrays(self, split: str, limit: int):
    """The fixed evaluation subset of `split` (train: the kNN bank, test: the queries)."""
    if (split, limit) not in self._arrays:
      source, seed = ((self.train_split, 1) if split == "train" else (self.test_split, 2))
      self._arrays[split, limit] = pipeline.eval_arrays(source, self.size, limit, seed)
    return self._arrays[split, limit]

  def __call__(self, params, *, final: bool) -> dict:
    """Periodic evaluations use small fixed subsets; `final` (also used for the initial network,
    the baseline) uses eval.final_bank_size / final_query_size (-1 = the whole split)."""
    ev = self.config.eval
    t0 = time.time()
    bank_limit, query_limit = ((ev.final_bank_size, ev.final_query_size) if final
                               else (ev.bank_size, ev.query_size))
    bank_x, bank_y = self.arrays("train", bank_limit)
    query_x, query_y = self.arrays("test", query_limit)
    bank = evaluation.extract_features(self.feature_fn, params, bank_x, self.batch_size, self.mesh)
    query = evaluation.extract_features(self.feature_fn, params, query_x, self.batch_size,
                                        self.mesh)
    top1 = evaluation.knn_top1(bank, bank_y, query, query_y, k=ev.knn_k,
                               temperature=ev.knn_temperature)
    probe = evaluation.linear_probe(bank, bank_y, query, query_y)
    return {"knn_top1": top1, "linear_top1": probe["top1"], "linear_l2": probe["l2"],
            "knn_bank": int(bank.shape[0]), "knn_queries": int(query.shape[0]),
            "eval_s": time.time() - t0}


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode=eval`: kNN + linear probe of the checkpoint `eval.checkpoint_step` (-1 = the latest) in
  WORKDIR/checkpoints, at the final evaluation sizes; appended to WORKDIR/metrics.jsonl with
  `evaluated_by: "mode=eval"` (the training curves in reports leave those lines out)."""
  validate_config(config)
  sources.check_source(config)
  # The data first: a bad image folder is reported before any checkpoint is touched.
  train_source, test_source = pipeline.load_source(config, "train"), pipeline.load_source(config,
                                                                                          "test")
  mesh = sharding_lib.make_mesh(config)
  model = build_model(config)
  _, abstract_state, state_shardings = state_layout(config, model, make_optimizer(config), mesh)
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=config.checkpoint.keep,
                                    every_steps=config.checkpoint.every_steps, async_save=False,
                                    read_only=True)
  try:
    steps = ckpt.all_steps()
    wanted = int(config.eval.get("checkpoint_step", -1))
    if not steps:
      raise UserError(f"no checkpoint in {ckpt.directory}; train first (same --workdir), or point "
                      f"--workdir at a run directory")
    step = max(steps) if wanted < 0 else wanted
    if step not in steps:
      raise UserError(f"eval.checkpoint_step={wanted} is not in {ckpt.directory}; saved steps: "
                      f"{', '.join(map(str, sorted(steps)))}")
    target = checkpointing.abstract_with_shardings(abstract_state, state_shardings)
    try:
      ckpt.check_compatible(step, target)
      state, meta = ckpt.restore(step, target)
    except UserError:
      raise   # written by a config of other shapes: named as such, not as unreadable
    except Exception as e:  # noqa: BLE001 - any read failure: name it; eval moves nothing
      reason = first_line(e)
      others = sorted(s for s in steps if s != step)
      raise UserError(f"checkpoint {step} in {ckpt.directory} cannot be read ({reason}); "
                      + (f"evaluate another with --config.eval.checkpoint_step (saved: "
                         f"{', '.join(map(str, others))})" if others else
                         "re-run training in this workdir to replace it")) from None
  finally:
    ckpt.close()
  evaluator = Evaluator(config, model, mesh, state_shardings, train_source, test_source)
  result = evaluator(eval_params(config, state), final=True)
  line = {**result, "evaluated_by": "mode=eval", "checkpoint_step": step}
  weights = config.eval.get("weights", "")   # "" = the objective's own choice
  if weights:
    line["eval_weights"] = weights
  if "wall_s" in meta:  # when the checkpoint was written, in the run's own clock
    line["wall_s"] = meta["wall_s"]
    line["train_wall_s"] = meta["wall_s"] - meta.get("eval_wall_s", 0.0)
  writer = MetricWriter(workdir, tensorboard=False)
  writer.write(step, line)
  writer.close()
  logging.info("checkpoint %d: %s", step, line)
  which = f" ({weights} weights)" if weights else ""
  print(f"checkpoint {step}{which}: kNN top-1 {result['knn_top1']:.4f}, linear probe top-1 "
        f"{result['linear_top1']:.4f} (bank/probe-train {result['knn_bank']}, queries "
        f"{result['knn_queries']}, {result['eval_s']:.0f}s)", flush=True)
  return line
