"""Metrics sinks: DIR/metrics.jsonl (the contract other tools read) and TensorBoard events.

Only process 0 writes. Lines are appended, so a resumed run continues the same file. Every line is
{"step": int, "kind": KIND, ...}; KINDS says what each kind carries.
"""
from __future__ import annotations

import json
import math
import os

from vit_accel import io

# kind -> what its lines carry.
KINDS = {
    "train": "the step's scalars (loss, lr, momentum, grad_norm, the objective's own), stage, "
             "sequence lengths, budget progress, wall-clock, images/s, input wait",
    "eval": "kNN top-1 and linear probe of the evaluated weights (training's own evaluations, and "
            "--mode=eval's with evaluated_by='mode=eval')",
    "online": "an online schedule's decision: the chosen strategy and the measured CA-MSE",
    "finetune": "--mode=finetune's test top-1 of the fine-tuned backbone + linear head, with init, "
                "checkpoint_step, epochs, train_loss, finetune_wall_s (at the checkpoint's step)",
}


class MetricWriter:

  def __init__(self, workdir: str, *, primary: bool, tensorboard: bool = True):
    """`primary`: whether this process writes (process 0 of a multi-process run; the others'
    writers do nothing)."""
    self.enabled = primary
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      from flax.metrics import tensorboard as flax_tb  # imports TF's summary ops lazily
      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def drop_after(self, step: int) -> None:
    """On resume: forget lines logged past the restored checkpoint (that work is redone), so the
    file reads as one consistent run. Rewritten atomically."""
    if not self.enabled:
      return
    path = self._jsonl.name
    self._jsonl.close()
    kept = [m for m in read_metrics(os.path.dirname(path)) if m["step"] <= step]
    io.atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))
    self._jsonl = open(path, "a", buffering=1)

  def write(self, step: int, metrics: dict, *, kind: str) -> None:
    """Appends one line {"step", "kind", **metrics}; `kind` one of KINDS (ValueError otherwise)."""
    if kind not in KINDS:
      raise ValueError(f"metrics kind {kind!r}; one of {', '.join(KINDS)}")
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.scalar(k, v, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  """numpy / jax scalars -> Python numbers for JSON."""
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep it visible rather than invalid
  return v


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """The lines of WORKDIR/metrics.jsonl in order ([] when there is none), only those of `kind` when
  given. Lines written before kinds existed get theirs from their fields."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  for m in lines:
    if "kind" not in m:
      m["kind"] = ("eval" if "knn_top1" in m else "online" if "online_choice" in m else "train")
  return [m for m in lines if kind is None or m["kind"] == kind]
