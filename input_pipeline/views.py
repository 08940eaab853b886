"""View recipes: an image + seed -> the augmented views an objective consumes (uint8, 3 channels).

Two global views (MoCo-v3, SimCLR, DINO), plus, for DINO's multi-crop, `aug.local_crops` local crops
at `aug.local_size`. Which ops and probabilities: `config.aug`, usually built by recipes.py.
"""
from __future__ import annotations

from input_pipeline.tf_runtime import tf

from input_pipeline import augment
from vit_accel import rng_streams


def augment_view(image, seed, size: int, aug, *, crop_scale, blur_p: float, solarize_p: float):
  """One augmented view: random resized crop to `size`, flip, colour jitter, greyscale, blur,
  solarise, with the `aug` recipe's strengths; crop scale and blur / solarise probabilities are
  per view (BYOL / MoCo-v3 asymmetry, DINO's local crops)."""
  s = tf.unstack(augment.split_seed(seed, 6))
  x = augment.random_resized_crop(image, s[0], size, scale=tuple(crop_scale),
                                  ratio=tuple(aug.crop_ratio))
  if aug.flip:
    x = augment.random_flip(x, s[1])
  x = augment.random_apply(
      lambda im, sd: augment.color_jitter(im, sd, aug.brightness, aug.contrast, aug.saturation,
                                          aug.hue), x, s[2], aug.jitter_p)
  if aug.grayscale_p > 0 and x.shape[-1] == 3:
    x = augment.random_apply(lambda im, _: augment.to_grayscale(im), x, s[3], aug.grayscale_p)
  sigma = tuple(aug.blur_sigma)
  x = augment.random_apply(lambda im, sd: augment.gaussian_blur(im, sd, sigma), x, s[4], blur_p)
  x = augment.random_apply(lambda im, _: augment.solarize(im), x, s[5], solarize_p)
  return to_rgb_uint8(x)


def to_rgb_uint8(image):
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return augment.to_uint8(image)


def two_views(image, seed, size: int, aug):
  """Two independently augmented global views of one image (MoCo-v3, SimCLR, DINO)."""
  s = tf.unstack(augment.split_seed(seed, 2))
  return tuple(augment_view(image, s[i], size, aug, crop_scale=aug.crop_scale,
                            blur_p=aug.blur_p[i], solarize_p=aug.solarize_p[i]) for i in range(2))


def local_views(image, seed, aug):
  """DINO's local crops: `aug.local_crops` small crops (scale `aug.local_crop_scale`) at
  `aug.local_size`, blur with `aug.local_blur_p`, no solarisation. Their seeds are folded from the
  view seed apart from the global views', so adding local crops leaves the global views unchanged."""
  return tuple(
      augment_view(image,
                   tf.random.experimental.stateless_fold_in(seed, rng_streams.LOCAL_CROP + j),
                   aug.local_size, aug, crop_scale=aug.local_crop_scale, blur_p=aug.local_blur_p,
                   solarize_p=0.0)
      for j in range(aug.local_crops))


def make_views(image, seed, size: int, aug) -> dict:
  """{'views': two global views} plus {'local_views': ...} when the recipe has local crops."""
  out = {"views": two_views(image, seed, size, aug)}
  if aug.local_crops:
    out["local_views"] = local_views(image, seed, aug)
  return out
