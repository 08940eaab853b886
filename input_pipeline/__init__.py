"""tf.data input pipeline: sources, augmentation ops, view recipes, per-host batching."""
import tensorflow as tf

# TensorFlow is only our data loader: it must never take GPU/TPU memory from JAX.
tf.config.set_visible_devices([], "GPU")
try:
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # no TPU platform registered in this TF build
  pass
