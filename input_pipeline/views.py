"""View recipes: an image + seed -> the augmented views an objective consumes (uint8, 3 channels)."""
from __future__ import annotations

from input_pipeline.tf_runtime import tf

from input_pipeline import augment


def augment_view(image, seed, size: int, aug, view_index: int):
  """One augmented view following the `config.aug` recipe; blur/solarise probabilities may differ
  per view (BYOL / MoCo-v3 asymmetry), given as one value per view."""
  s = tf.unstack(augment.split_seed(seed, 6))
  x = augment.random_resized_crop(image, s[0], size, scale=tuple(aug.crop_scale),
                                  ratio=tuple(aug.crop_ratio))
  if aug.flip:
    x = augment.random_flip(x, s[1])
  x = augment.random_apply(
      lambda im, sd: augment.color_jitter(im, sd, aug.brightness, aug.contrast, aug.saturation,
                                          aug.hue), x, s[2], aug.jitter_p)
  if aug.grayscale_p > 0 and x.shape[-1] == 3:
    x = augment.random_apply(lambda im, _: augment.to_grayscale(im), x, s[3], aug.grayscale_p)
  x = augment.random_apply(lambda im, sd: augment.gaussian_blur(im, sd), x, s[4],
                           aug.blur_p[view_index])
  x = augment.random_apply(lambda im, _: augment.solarize(im), x, s[5],
                           aug.solarize_p[view_index])
  return to_rgb_uint8(x)


def to_rgb_uint8(image):
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return augment.to_uint8(image)


def two_views(image, seed, size: int, aug):
  """Two independently augmented views of one image (MoCo-v3, SimCLR)."""
  s = tf.unstack(augment.split_seed(seed, 2))
  return tuple(augment_view(image, s[i], size, aug, i) for i in range(2))
