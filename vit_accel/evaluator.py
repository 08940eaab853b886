"""Evaluating a backbone: kNN and a linear probe on frozen CLS features, during training and on any
saved checkpoint.

Bank / probe-train set = the train split, queries / probe-test set = the test split, both at full
sequence length (no compression at evaluation). Features are extracted once per evaluation and
shared by the two protocols. --mode=eval (vit_accel/modes/eval.py) runs it on a saved checkpoint.
"""
from __future__ import annotations

import time

import jax

from input_pipeline import pipeline, sources
from vit_accel import evaluation, rng_streams
from vit_accel import sharding as sharding_lib
from vit_accel.state import eval_params
from vit_accel.train_step import normalize_images

# eval.linear -> the probe: closed-form ridge, or logistic regression fitted with L-BFGS. Both take
# the same standardised features and return {"top1", "l2" (the chosen regularisation), ...}.
PROBES = {"ridge": evaluation.linear_probe, "logistic": evaluation.logistic_probe}


def linear_kind(config) -> str:
  """config.eval.linear ("ridge" when a config predates the key)."""
  return config.eval.get("linear", "ridge")


class Evaluator:
  """kNN top-1 (weighted, k / temperature from config) and linear-probe top-1 (eval.linear: ridge,
  evaluation.linear_probe, or logistic, evaluation.logistic_probe) of backbone CLS features. Call it
  with `eval_params(config, state)`: the trained network, or DINO's teacher. The result's
  `linear_top1` is the probe that ran, named by `linear_probe`; `linear_l2` is its chosen
  regularisation (ridge: strength x samples; logistic: weight decay on the mean loss)."""

  def __init__(self, config, model, mesh, state_shardings, train_source, test_source):
    """train_source / test_source: sources (pipeline.load_source) or bare uint8 image arrays
    (sources.as_source wraps them, with zero labels)."""
    self.config = config
    self.mesh = mesh
    ev = config.eval
    size = config.model.image_size
    self.size = size
    self.train_source = sources.as_source(train_source)
    self.test_source = sources.as_source(test_source)
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
      source, seed = ((self.train_source, rng_streams.EVAL_BANK) if split == "train"
                      else (self.test_source, rng_streams.EVAL_QUERIES))
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
    kind = linear_kind(self.config)
    probe = PROBES[kind](bank, bank_y, query, query_y)
    return {"knn_top1": top1, "linear_top1": probe["top1"], "linear_l2": probe["l2"],
            "linear_probe": kind, "knn_bank": int(bank.shape[0]),
            "knn_queries": int(query.shape[0]), "eval_s": time.time() - t0}
