"""TensorFlow, imported at its first use and configured as a data loader only.

TF must never take GPU/TPU memory from JAX: every module of the pipeline reads `tf` from here, and
the first attribute read imports TensorFlow and hides the accelerators from it. Until then nothing
is imported, so the pipeline's modules load on a machine without TensorFlow, which can still train
on an in-memory source with data.augment_on='device' (input_pipeline/streams.py).
"""
from __future__ import annotations

import importlib
import importlib.util

from vit_accel.errors import UserError

_module = None


def load():
  """The configured `tensorflow` module (imported and its accelerators hidden on the first call).
  Call it before importing anything that imports TensorFlow itself (tensorflow_datasets), so the
  accelerators are hidden before TF starts.

  Raises:
    UserError: TensorFlow is not importable.
  """
  return _tensorflow()


def _tensorflow():
  global _module
  if _module is None:
    try:
      module = importlib.import_module("tensorflow")
    except ImportError as e:
      raise UserError(f"TensorFlow is not importable here ({e}): the host input pipeline "
                      f"(tf.data) needs it; run ./setup.sh, or train an in-memory source "
                      f"(data.source='fashion_mnist') with --config.data.augment_on=device") from None
    module.config.set_visible_devices([], "GPU")
    try:
      module.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # no TPU platform registered in this TF build
      pass
    _module = module
  return _module


def available() -> bool:
  """Whether TensorFlow can be imported here (found, not imported: cheap)."""
  if _module is not None:
    return True
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):   # ValueError: sys.modules holds None for it (blocked)
    return False


class _LazyTensorFlow:
  """Stands for the `tensorflow` module: an attribute read imports and configures it once."""

  def __getattr__(self, name: str):
    return getattr(_tensorflow(), name)


tf = _LazyTensorFlow()

__all__ = ["tf"]
