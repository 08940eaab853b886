"""Stateless, seeded image augmentation ops for tf.data.

Every op takes a float32 image in [0, 1] of shape [H, W, C] and an int seed of shape [2]; the same seed
always gives the same result, eagerly or inside `tf.data.Dataset.map`. These are the building blocks of
the view recipes (views.py): random resized crop, flip, colour jitter (brightness, contrast,
saturation, hue), greyscale, Gaussian blur and solarisation, the op set of the SimCLR / BYOL / MoCo-v3
/ DINO recipes.
"""
from __future__ import annotations

import math

from input_pipeline.tf_runtime import tf


def split_seed(seed, num: int):
  """`num` independent seeds (shape [num, 2]) from one seed."""
  return tf.random.experimental.stateless_split(seed, num=num)


def _coin(seed, p: float):
  return tf.random.stateless_uniform([], seed=seed) < p


def random_apply(fn, image, seed, p: float):
  """Apply `fn(image, seed)` with probability p (decided by `seed`)."""
  if p <= 0.0:
    return image
  if p >= 1.0:
    return fn(image, seed)
  coin_seed, fn_seed = tf.unstack(split_seed(seed, 2))
  return tf.cond(_coin(coin_seed, p), lambda: fn(image, fn_seed), lambda: image)


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Crop a random box (area fraction in `scale`, aspect in `ratio`) and resize to size x size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  crop.set_shape([None, None, image.shape[-1]])  # slice of a dynamic size forgets the channels
  crop = tf.image.resize(crop[None], (size, size), method="bilinear", antialias=True)[0]
  return tf.clip_by_value(crop, 0.0, 1.0)


def center_resize(image, size: int):
  """Deterministic evaluation view: resize the whole image to size x size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return tf.image.resize(image[None], (size, size), method="bilinear", antialias=True)[0]


def random_flip(image, seed):
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def adjust_brightness(image, seed, strength: float):
  """Multiply by a factor in [1 - s, 1 + s] (SimCLR's brightness, not TF's additive one)."""
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, seed, strength: float):
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  mean = tf.reduce_mean(to_grayscale(image))
  return tf.clip_by_value((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image, seed, strength: float):
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  grey = to_grayscale(image)
  return tf.clip_by_value((image - grey) * factor + grey, 0.0, 1.0)


def adjust_hue(image, seed, strength: float):
  delta = tf.random.stateless_uniform([], seed, -strength, strength)
  return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def to_grayscale(image):
  """Luma (ITU-R 601) broadcast back to the input's channel count."""
  if image.shape[-1] == 1:
    return image
  grey = tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
  return tf.broadcast_to(grey, tf.shape(image))


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0):
  """Brightness, contrast, saturation, hue jitter in a fixed order (saturation/hue need colour)."""
  seeds = tf.unstack(split_seed(seed, 4))
  if brightness > 0:
    image = adjust_brightness(image, seeds[0], brightness)
  if contrast > 0:
    image = adjust_contrast(image, seeds[1], contrast)
  if image.shape[-1] == 3:
    if saturation > 0:
      image = adjust_saturation(image, seeds[2], saturation)
    if hue > 0:
      image = adjust_hue(image, seeds[3], hue)
  return image


def gaussian_blur(image, seed, sigma=(0.1, 2.0), kernel_frac: float = 0.1):
  """Separable Gaussian blur, sigma drawn from `sigma`; kernel ~ kernel_frac of the image side
  (SimCLR uses 10%), in pixels of *this* image, so it scales with the dataset's resolution."""
  s = tf.random.stateless_uniform([], seed, sigma[0], sigma[1])
  radius = max(1, int(math.ceil(kernel_frac * int(image.shape[0]) / 2)))
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  k = tf.exp(-tf.square(x) / (2.0 * tf.square(s)))
  k = k / tf.reduce_sum(k)
  channels = image.shape[-1]
  kx = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, channels, 1])
  ky = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(image[None], kx, [1, 1, 1, 1], "SAME")
  out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "SAME")
  return out[0]


def solarize(image, threshold: float = 0.5):
  return tf.where(image < threshold, image, 1.0 - image)


def to_uint8(image):
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
