"""TensorFlow, imported once and configured as a data loader only.

TF must never take GPU/TPU memory from JAX: every module of the pipeline imports `tf` from here.
"""
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")
try:
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # no TPU platform registered in this TF build
  pass

__all__ = ["tf"]
