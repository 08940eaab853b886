"""Metrics sinks: DIR/metrics.jsonl (the contract other tools read) and TensorBoard events.

Only process 0 writes. Lines are appended, so a resumed run continues the same file.
"""
from __future__ import annotations

import json
import math
import os

import jax


class MetricWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
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
    with open(path + ".tmp", "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a", buffering=1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
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


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
