"""tf.data input pipeline: sources, augmentation ops, view recipes, per-host batching.

sources.py is NumPy-only, so configs and data can be checked before TensorFlow is imported.
"""
