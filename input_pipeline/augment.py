"""Stateless, seeded image augmentation ops for tf.data.

Every colour op takes a float32 image in [0, 1] of shape [H, W, C] (C = 1 or 3) and an int seed of
shape [2]; the same seed always gives the same result, eagerly or inside `tf.data.Dataset.map`. These
are the building blocks of the view recipes (views.py): random resized crop, flip, colour jitter
(brightness, contrast, saturation, hue), greyscale, Gaussian blur and solarisation, the op set of the
SimCLR / BYOL / MoCo-v3 / DINO recipes.

The random resized crop comes in two halves, so that a JPEG view can decode only its own window:
`sample_crop_box` draws the box from the image's shape alone, and the crop is then sliced out of a
decoded image (`crop_image`) or decoded straight from the JPEG bytes (`decode_jpeg_crop`, as
big_vision's `decode_jpeg_and_inception_crop`); `resize_crop` takes either to the view size.

Costs are kept down without changing what is computed (up to float rounding): every op after the
crop works on the view-size image, the flip is applied to the crop before it is resized, the
antialiasing filter is skipped when the crop is only enlarged (where it changes nothing; how a crop
is shrunk is the recipe's `aug.downscale`, see `resize_crop`), luma blends are one 3x3
colour-matrix product, clips are one op, and the blur kernel stops at 4 sigma (see
`gaussian_blur`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from input_pipeline.tf_runtime import tf

from vit_accel import config_domains

# ITU-R BT.601 luma weights (the greyscale of SimCLR / torchvision / PIL's convert("L")).
LUMA = (0.299, 0.587, 0.114)
# TF's default JPEG IDCT is the fast integer one; the accurate one is what Pillow (libjpeg's default)
# uses, so a JPEG decodes to the same pixels on the TF and the Pillow paths.
JPEG_DCT_METHOD = "INTEGER_ACCURATE"


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


# ------------------------------------------------------------------------ random resized crop
class CropBox(NamedTuple):
  """A crop window in pixels: int32 scalars (top, left, height, width)."""
  y: tf.Tensor
  x: tf.Tensor
  height: tf.Tensor
  width: tf.Tensor


def sample_crop_box(image_shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> CropBox:
  """Draw the random-resized-crop box of an image from its shape alone.

  The Inception-style crop (Szegedy et al. 2015, "Going deeper with convolutions"; the
  RandomResizedCrop of SimCLR / BYOL / MoCo-v3 / DINO) as TF samples it:
  `tf.image.stateless_sample_distorted_bounding_box` with area fraction in `scale`, aspect
  (width / height) in `ratio`, 10 attempts, then the whole image.

  Args:
    image_shape: int [3] (height, width, channels) of the image as decoded; int32 or int64.
    seed: int [2], the crop's stateless seed.
    scale: (min, max) area of the box as a fraction of the image's.
    ratio: (min, max) aspect ratio of the box.
  Returns:
    CropBox of int32 scalars, in pixels, inside the image. The same shape and seed always give the
    same box, whatever holds the pixels (a decoded array or the JPEG bytes).
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.cast(image_shape, tf.int32), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=tuple(ratio),
      area_range=tuple(scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
  return CropBox(begin[0], begin[1], size[0], size[1])


def crop_image(image, box: CropBox):
  """image [H, W, C] (any dtype) -> the box's pixels [box.height, box.width, C], same dtype."""
  crop = tf.slice(image, tf.stack([box.y, box.x, 0]), tf.stack([box.height, box.width, -1]))
  crop.set_shape([None, None, image.shape[-1]])  # slice of a dynamic size forgets the channels
  return crop


def decode_jpeg_crop(data, box: CropBox, channels: int = 3):
  """Decode only a box of a JPEG: uint8 [box.height, box.width, channels].

  `tf.image.decode_and_crop_jpeg` (libjpeg-turbo skips the rows above the box and stops below
  it); with the accurate integer IDCT the pixels equal a whole decode sliced (Pillow's too), but
  for chroma upsampling at the box's edges (a few levels on an edge column of subsampled files).

  Args:
    data: tf.string scalar, the encoded JPEG.
    box: a CropBox inside the image (sample_crop_box on tf.image.extract_jpeg_shape(data)).
    channels: 3 (grey JPEGs are replicated to RGB, as PIL's convert("RGB")) or 1.
  Raises:
    tf.errors.InvalidArgumentError when the iterator reaches a file libjpeg cannot decode.
  """
  window = tf.stack([box.y, box.x, box.height, box.width])
  crop = tf.image.decode_and_crop_jpeg(data, window, channels=channels,
                                       dct_method=JPEG_DCT_METHOD)
  crop.set_shape([None, None, channels])
  return crop


# How a crop larger than its view is shrunk (aug.downscale); enlarging is always plain bilinear.
DOWNSCALE_FILTERS = config_domains.DOMAINS["aug.downscale"].values


def resize_crop(crop, size: int, downscale: str = "antialias"):
  """A crop (uint8 in 0..255, or float in [0, 1]) [h, w, C] -> float32 [size, size, C] in [0, 1]
  (up to float rounding).

  Along a side that grows, plain bilinear interpolation (every filter below is that bilinear
  one there). Along a side that shrinks, `downscale`:
    "antialias"  bilinear with the filter widened by the shrink factor (`tf.image.resize(...,
                 antialias=True)`; PIL's and so torchvision's RandomResizedCrop): the default.
    "area"       each output pixel the mean of the input pixels under its footprint, weighted by
                 overlap (`method="area"`, OpenCV's INTER_AREA): a box filter, so much less
                 aliasing than sampling, a little sharper than "antialias", ~4x cheaper per
                 224 px view (bench/pipeline.py measures the whole view).
    "bilinear"   plain bilinear sampling (big_vision's inception crop): cheapest, aliases on
                 strong shrinks.
  When neither side shrinks the antialiasing filter is the plain bilinear one, so the 4x cheaper
  `antialias=False` resize is used there (same values up to float rounding, < 2e-7).

  Raises:
    ValueError: `downscale` not one of DOWNSCALE_FILTERS.
  """
  if downscale not in DOWNSCALE_FILTERS:
    raise ValueError(f"downscale={downscale!r}; expected one of {DOWNSCALE_FILTERS}")
  shape = tf.shape(crop)
  h_shrinks, w_shrinks = shape[0] > size, shape[1] > size
  batch = crop[None]

  def bilinear(x):
    return tf.image.resize(x, (size, size), method="bilinear", antialias=False)

  if downscale == "bilinear":
    out = bilinear(batch)
  elif downscale == "antialias":
    out = tf.cond(
        tf.logical_or(h_shrinks, w_shrinks),
        lambda: tf.image.resize(batch, (size, size), method="bilinear", antialias=True),
        lambda: bilinear(batch))
  else:
    # Area only along the shrinking sides (area along a growing side would repeat pixels, as
    # nearest-neighbour does): an area resize to (size or h, size or w) is the identity along a
    # side it leaves alone, then bilinear takes the other side up (the identity along the first).
    def mixed():
      hw = tf.stack([tf.where(h_shrinks, size, shape[0]), tf.where(w_shrinks, size, shape[1])])
      return bilinear(tf.image.resize(batch, hw, method="area"))
    out = tf.case([(tf.logical_and(h_shrinks, w_shrinks),
                    lambda: tf.image.resize(batch, (size, size), method="area")),
                   (tf.logical_or(h_shrinks, w_shrinks), mixed)],
                  default=lambda: bilinear(batch))
  out = out[0]
  # Every filter's weights are non-negative and sum to 1: the values stay in the input's range (up
  # to float rounding, which every later op's clip, and to_uint8's, absorbs).
  return out * (1.0 / 255.0) if crop.dtype == tf.uint8 else out


def random_resized_crop(image, seed, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Crop a random box (sample_crop_box: area fraction in `scale`, aspect in `ratio`) of a decoded
  image [H, W, C] (float in [0, 1] or uint8) and resize it to float32 [size, size, C] in [0, 1]
  (resize_crop)."""
  return resize_crop(crop_image(image, sample_crop_box(tf.shape(image), seed, scale, ratio)), size)


def center_resize(image, size: int):
  """Deterministic evaluation view: resize the whole image to size x size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return tf.image.resize(image[None], (size, size), method="bilinear", antialias=True)[0]


# ---------------------------------------------------------------------------------- colour ops
def random_flip(image, seed):
  """Mirror left-right with probability 1/2 (`tf.image.stateless_random_flip_left_right`)."""
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def _clip01(image):
  """clip to [0, 1] in one pass (tf.clip_by_value is a minimum then a maximum: two)."""
  return tf.raw_ops.ClipByValue(t=image, clip_value_min=tf.constant(0.0, image.dtype),
                                clip_value_max=tf.constant(1.0, image.dtype))


def _mix_colours(image, matrix):
  """[H, W, 3] pixels times a 3x3 colour matrix (out_j = sum_i in_i * matrix[i, j]): one small
  matmul, several times cheaper than slicing the channels apart and broadcasting back."""
  shape = tf.shape(image)
  return tf.reshape(tf.matmul(tf.reshape(image, [-1, 3]), matrix), shape)


def _luma_matrix(keep):
  """The 3x3 matrix of x -> keep * x + (1 - keep) * luma(x) (keep = 0: greyscale)."""
  luma = tf.tile(tf.constant(LUMA)[:, None], [1, 3])
  return keep * tf.eye(3) + (1.0 - keep) * luma


def adjust_brightness(image, seed, strength: float):
  """Multiply by a factor in [1 - s, 1 + s] (SimCLR's brightness, not TF's additive one)."""
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  if strength < 1.0:  # a positive factor keeps pixels >= 0: only the top needs clipping
    return tf.minimum(image * factor, 1.0)
  return _clip01(image * factor)


def adjust_contrast(image, seed, strength: float):
  """Blend with the mean luma, factor in [1 - s, 1 + s] (SimCLR / torchvision's contrast)."""
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  channel_means = tf.reduce_mean(image, axis=[0, 1])   # mean of luma = luma of the channel means
  mean = channel_means[0] if image.shape[-1] == 1 else tf.reduce_sum(channel_means * LUMA)
  return _clip01((image - mean) * factor + mean)


def adjust_saturation(image, seed, strength: float):
  """Blend with the pixel's luma, factor in [1 - s, 1 + s] (SimCLR / torchvision's saturation):
  x * f + luma(x) * (1 - f), as one 3x3 colour matrix. Grey images are returned as they are."""
  factor = tf.random.stateless_uniform([], seed, 1.0 - strength, 1.0 + strength)
  if image.shape[-1] == 1:
    return image
  return _clip01(_mix_colours(image, _luma_matrix(factor)))


def adjust_hue(image, seed, strength: float):
  """Rotate the HSV hue by a fraction of a turn in [-s, s] (`tf.image.adjust_hue`)."""
  delta = tf.random.stateless_uniform([], seed, -strength, strength)
  return _clip01(tf.image.adjust_hue(image, delta))


def to_grayscale(image):
  """Luma (ITU-R 601) broadcast back to the input's channel count."""
  if image.shape[-1] == 1:
    return image
  return _mix_colours(image, _luma_matrix(0.0))


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


# Taps further than this many sigmas from the centre are left out of the blur kernel: they hold
# 6e-5 of a Gaussian's mass (scipy.ndimage.gaussian_filter's default truncate=4.0), so a pixel
# moves by less than 0.02 of a uint8 level, and a sigma-0.5 blur costs 5 taps, not 25.
BLUR_TRUNCATE = 4.0


def gaussian_blur(image, seed, sigma=(0.1, 2.0), kernel_frac: float = 0.1):
  """Separable Gaussian blur (SimCLR, Chen et al. 2020), sigma drawn from `sigma`, in pixels.

  The kernel spans ~kernel_frac of the image side (SimCLR uses 10%), in pixels of *this* image, so
  it scales with the dataset's resolution; taps beyond BLUR_TRUNCATE sigma are dropped (weight
  < 3.4e-4 of the centre tap). Zero padding at the borders ("SAME"), as before.

  Args:
    image: float32 [H, W, C] in [0, 1], H and W static.
    seed: int [2].
  Returns:
    float32 [H, W, C].
  """
  s = tf.random.stateless_uniform([], seed, sigma[0], sigma[1])
  radius = max(1, int(math.ceil(kernel_frac * int(image.shape[0]) / 2)))
  radius = tf.minimum(radius, tf.maximum(1, tf.cast(tf.math.ceil(BLUR_TRUNCATE * s), tf.int32)))
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
  """Invert pixels at or above `threshold` (BYOL's solarisation)."""
  if threshold == 0.5:  # x < 0.5 <=> x < 1 - x: the same pixels, one op fewer
    return tf.minimum(image, 1.0 - image)
  return tf.where(image < threshold, image, 1.0 - image)


def to_uint8(image):
  """float [0, 1] -> uint8 0..255, rounded (values outside [0, 1] clipped)."""
  return tf.cast(tf.round(_clip01(image) * 255.0), tf.uint8)
