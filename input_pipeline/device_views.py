"""The view recipes in JAX, on the accelerator: a batch of uint8 images + keys -> the augmented views.

The same recipes (`config.aug`) and the same distributions as the tf.data views (views.py,
augment.py), computed for a whole batch at once on the device that trains (`data.augment_on='device'`), where
the host would otherwise have to keep up with a fast accelerator. In-memory datasets (make_views)
need no TensorFlow at all: the images are on the device, every draw is made here. File sources
(views_from_windows): the host draws each view's crop box and decodes the one window of the image
holding them (views.make_windows), and the rest is made here from those boxes. The draws come from
jax.random, so a seed gives other views than on the host; what is drawn, and how a draw becomes
pixels, is the host's (tests/test_device_views.py compares the two, op by op and in distribution;
tests/test_window_views.py the views from windows with the host's).

Per view: random resized crop (TF's `sample_distorted_bounding_box` sampler, reproduced; crop and
resize as two matmuls with per-box weights, antialiased when shrinking: the values of
`tf.image.resize(crop, antialias=True)`), flip, colour jitter (brightness, contrast, saturation, hue in
that order, with probability `aug.jitter_p`), greyscale, Gaussian blur, solarisation -> uint8.
Every op is computed for every example and kept where its coin says so (no data-dependent
control flow on the device).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vit_accel import rng_streams

LUMA = (0.299, 0.587, 0.114)      # ITU-R BT.601, as augment.LUMA
BLUR_TRUNCATE = 4.0               # as augment.BLUR_TRUNCATE
CROP_ATTEMPTS = 10                # as augment.sample_crop_box (TF's max_attempts)
DEVICE_DOWNSCALE = ("antialias", "bilinear")   # the aug.downscale filters made here
# Full float32 matmuls: a GPU's default (TF32 on Ampere and later) would move pixels by a level.
HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------ random resized crop
def sample_crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """The random-resized-crop box of a height x width image, drawn as TensorFlow draws it.

  `tf.image.sample_distorted_bounding_box` (min_object_covered 0, 10 attempts, then the whole
  image; the Inception crop of Szegedy et al. 2015), step by step: aspect (width / height)
  uniform in `ratio`; height an integer uniform between the heights of the smallest and largest
  allowed area at that aspect (so not area-uniform, as torchvision's is); width rounded from it;
  an attempt that rounds outside the area range or the image fails; the offsets uniform in
  [0, H - h) and [0, W - w) (TF's: a crop smaller than the image never touches its bottom or
  right edge).

  Args:
    key: a jax.random key (one box; vmap for a batch).
    height, width: the image's size, px (static).
    scale: (min, max) area of the box as a fraction of the image's.
    ratio: (min, max) aspect ratio (width / height) of the box.
  Returns:
    int32 [4]: top, left, box height, box width, inside the image.
  """
  k_ratio, k_height, k_y, k_x = jax.random.split(key, 4)
  shape = (CROP_ATTEMPTS,)
  ar = jax.random.uniform(k_ratio, shape, jnp.float32, ratio[0], ratio[1])
  min_area = jnp.float32(scale[0] * width * height)
  max_area = jnp.float32(scale[1] * width * height)
  h = jnp.rint(jnp.sqrt(min_area / ar))
  max_h = jnp.rint(jnp.sqrt(max_area / ar))
  # The largest height whose rounded width still fits the image (TF's correction).
  fitted = jnp.floor((width + 0.5 - 1e-7) / ar)
  fitted = jnp.where(jnp.rint(fitted * ar) > width, fitted - 1, fitted)
  max_h = jnp.where(jnp.rint(max_h * ar) > width, fitted, max_h)
  max_h = jnp.minimum(max_h, height)
  h = jnp.minimum(h, max_h)
  span = (max_h - h + 1).astype(jnp.int32)
  h = h + jnp.floor(jax.random.uniform(k_height, shape) * span)
  w = jnp.rint(h * ar)
  h = jnp.where(w * h < min_area, h + 1, h)
  w = jnp.rint(h * ar)
  h = jnp.where(w * h > max_area, h - 1, h)
  w = jnp.rint(h * ar)
  area = w * h
  ok = ((area >= min_area) & (area <= max_area) & (w <= width) & (h <= height)
        & (w > 0) & (h > 0))
  y = jnp.floor(jax.random.uniform(k_y, shape) * jnp.maximum(height - h, 1))
  x = jnp.floor(jax.random.uniform(k_x, shape) * jnp.maximum(width - w, 1))
  y = jnp.where(h < height, y, 0)
  x = jnp.where(w < width, x, 0)
  first = jnp.argmax(ok)
  box = jnp.stack([y[first], x[first], h[first], w[first]]).astype(jnp.int32)
  return jnp.where(ok.any(), box, jnp.array([0, 0, height, width], jnp.int32))


def _resize_weights(start, length, in_size: int, out_size: int, antialias: bool):
  """[in_size, out_size] weights taking the span [start, start + length) of one axis to out_size
  samples: the triangle (bilinear) filter at half-pixel centres, widened by the shrink factor
  when `antialias` and shrinking, each column renormalised over the pixels whose centre lies
  inside the span (as TensorFlow's scale-and-translate resize of the cropped span: nothing outside
  it contributes). start and length may be fractional (a box scaled with its window); for
  integers the pixels are exactly start .. start + length - 1."""
  length = length.astype(jnp.float32)
  inv_scale = length / out_size
  width = jnp.maximum(inv_scale, 1.0) if antialias else 1.0
  centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale - 0.5   # in the span
  pixel = jnp.arange(in_size, dtype=jnp.float32) - start.astype(jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(centre[None, :] - pixel[:, None]) / width)
  # Pixel centres (pixel + 0.5) inside [0, length): for a fractional span, a pixel it covers less
  # than half of (or a float end an ulp past the window, into its zero padding) is left out.
  weights = jnp.where(((pixel >= -0.5) & (pixel < length - 0.5))[:, None], weights, 0.0)
  return weights / jnp.maximum(weights.sum(0, keepdims=True), 1e-12)


def crop_resize(image, box, size: int, downscale: str = "antialias"):
  """The box of an image, resized to size x size: float32 [size, size, C] in the image's units.

  Bilinear (triangle filter) with half-pixel centres, over the box's pixels only; along a side
  that shrinks, with downscale='antialias' the filter is widened by the shrink factor, as
  `tf.image.resize(crop, ..., antialias=True)` and PIL; with 'bilinear' it is not (big_vision's
  inception crop). For an integer box the same values as augment.resize_crop of
  augment.crop_image, up to float rounding, computed as two matmuls with per-box weight matrices
  (the box's size is data, so no dynamic slice); a fractional box (scaled with its window,
  views.make_windows) takes the pixels whose centres it covers.

  Args:
    image: [H, W, C], any real dtype.
    box: [4] (top, left, height, width), int32 as sample_crop_box, or float32.
    size: the view's side, px (static).
    downscale: 'antialias' or 'bilinear' (aug.downscale; its 'area' filter is the host's only).
  Raises:
    ValueError: another `downscale`.
  """
  if downscale not in DEVICE_DOWNSCALE:
    raise ValueError(f"downscale={downscale!r}; on the device: one of {DEVICE_DOWNSCALE}")
  antialias = downscale == "antialias"
  rows = _resize_weights(box[0], box[2], image.shape[0], size, antialias)
  cols = _resize_weights(box[1], box[3], image.shape[1], size, antialias)
  return jnp.einsum("hy,hwc,wx->yxc", rows, image.astype(jnp.float32), cols, precision=HIGHEST)


# ---------------------------------------------------------------------------------- colour ops
def _uniform(key, low: float, high: float):
  return jax.random.uniform(key, (), jnp.float32, low, high)


def _luma(image):
  """[H, W, C] -> [H, W, 1]: BT.601 luma (a grey image is its own luma)."""
  if image.shape[-1] == 1:
    return image
  return jnp.tensordot(image, jnp.asarray(LUMA, image.dtype), axes=1, precision=HIGHEST)[..., None]


def brightness_by(image, factor):
  """Multiply by `factor`, clip to [0, 1] (SimCLR's brightness)."""
  return jnp.clip(image * factor, 0.0, 1.0)


def contrast_by(image, factor):
  """Blend with the image's mean luma by `factor` (SimCLR / torchvision's contrast)."""
  mean = _luma(image).mean()
  return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def saturation_by(image, factor):
  """Blend each pixel with its luma by `factor`; grey images unchanged."""
  if image.shape[-1] == 1:
    return image
  return jnp.clip(image * factor + _luma(image) * (1.0 - factor), 0.0, 1.0)


def adjust_brightness(image, key, strength: float):
  """brightness_by with a factor uniform in [1 - s, 1 + s]."""
  return brightness_by(image, _uniform(key, 1.0 - strength, 1.0 + strength))


def adjust_contrast(image, key, strength: float):
  """contrast_by with a factor uniform in [1 - s, 1 + s]."""
  return contrast_by(image, _uniform(key, 1.0 - strength, 1.0 + strength))


def adjust_saturation(image, key, strength: float):
  """saturation_by with a factor uniform in [1 - s, 1 + s]."""
  return saturation_by(image, _uniform(key, 1.0 - strength, 1.0 + strength))


def _rgb_to_hsv(rgb):
  """[..., 3] in [0, 1] -> hue (turns, [0, 1)), saturation, value; tf.image.rgb_to_hsv's."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = rgb.max(-1)
  chroma = value - rgb.min(-1)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(value == r, (g - b) / safe,
                  jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue = jnp.where(chroma > 0, hue / 6.0, 0.0)
  return jnp.mod(hue, 1.0), saturation, value


def _hsv_to_rgb(hue, saturation, value):
  """The inverse of _rgb_to_hsv: [...] x 3 -> [..., 3]."""
  def channel(n):
    k = jnp.mod(n + hue * 6.0, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def hue_by(image, delta):
  """Rotate the HSV hue by `delta` turns (`tf.image.adjust_hue`), clip; grey images unchanged."""
  if image.shape[-1] == 1:
    return image
  hue, sat, value = _rgb_to_hsv(image)
  return jnp.clip(_hsv_to_rgb(jnp.mod(hue + delta, 1.0), sat, value), 0.0, 1.0)


def adjust_hue(image, key, strength: float):
  """hue_by a fraction of a turn uniform in [-s, s]."""
  return hue_by(image, _uniform(key, -strength, strength))


def to_grayscale(image):
  """Luma broadcast back to the input's channels."""
  return jnp.broadcast_to(_luma(image), image.shape)


def color_jitter(image, key, brightness: float, contrast: float, saturation: float, hue: float):
  """Brightness, contrast, saturation, hue, in that order (augment.color_jitter's)."""
  keys = jax.random.split(key, 4)
  if brightness > 0:
    image = adjust_brightness(image, keys[0], brightness)
  if contrast > 0:
    image = adjust_contrast(image, keys[1], contrast)
  if saturation > 0:
    image = adjust_saturation(image, keys[2], saturation)
  if hue > 0:
    image = adjust_hue(image, keys[3], hue)
  return image


def _blur_matrix(size: int, sigma, radius: int):
  """[size, size] banded matrix of a 1-D Gaussian (taps beyond ceil(BLUR_TRUNCATE * sigma) and
  `radius` dropped, renormalised), zero padding at the borders: row i is output pixel i."""
  offsets = jnp.arange(size)[None, :] - jnp.arange(size)[:, None]
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  reach = jnp.minimum(radius, jnp.maximum(1.0, jnp.ceil(BLUR_TRUNCATE * sigma)))
  kernel = jnp.where(jnp.abs(taps) <= reach, jnp.exp(-taps**2 / (2.0 * sigma**2)), 0.0)
  kernel = kernel / kernel.sum()
  inside = jnp.abs(offsets) <= radius
  return jnp.where(inside, kernel[jnp.clip(offsets + radius, 0, 2 * radius)], 0.0)


def gaussian_blur(image, key, sigma=(0.1, 2.0), kernel_frac: float = 0.1):
  """Separable Gaussian blur, sigma (px) uniform in `sigma`; the kernel spans ~kernel_frac of the
  side and stops at BLUR_TRUNCATE sigma; zero padding (augment.gaussian_blur's, as two matmuls
  with banded matrices). image: float32 [S, S, C]."""
  s = _uniform(key, sigma[0], sigma[1])
  side = image.shape[0]
  radius = max(1, int(math.ceil(kernel_frac * side / 2)))
  m = _blur_matrix(side, s, radius)
  return jnp.einsum("ij,jkc,lk->ilc", m, image, m, precision=HIGHEST)


def solarize(image):
  """Invert pixels at or above 0.5 (BYOL's solarisation)."""
  return jnp.minimum(image, 1.0 - image)


def to_uint8(image):
  """float [0, 1] -> uint8, rounded, clipped; grey tiled to 3 channels."""
  out = jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint8)
  return jnp.tile(out, (1, 1, 3)) if out.shape[-1] == 1 else out


def _maybe(key, p: float, fn, image):
  """fn(image, key') with probability p (both computed: no branching on the device)."""
  if p <= 0.0:
    return image
  coin_key, fn_key = jax.random.split(key)
  if p >= 1.0:
    return fn(image, fn_key)
  return jnp.where(jax.random.uniform(coin_key) < p, fn(image, fn_key), image)


# --------------------------------------------------------------------------------------- views
def augment_view(image, key, size: int, aug, *, crop_scale, blur_p: float, solarize_p: float):
  """One augmented view of one image (views.augment_view's recipe, on the device).

  Args:
    image: uint8 [H, W, C], C = 1 or 3.
    key: a jax.random key.
    size: the view's side, px.
    aug: the recipe (config.aug).
    crop_scale, blur_p, solarize_p: this view's crop area range and probabilities.
  Returns:
    uint8 [size, size, 3].
  """
  k_crop = jax.random.split(key, 6)[0]
  box = sample_crop_box(k_crop, image.shape[0], image.shape[1], tuple(crop_scale),
                        tuple(aug.crop_ratio))
  return view_of_box(image, box, key, size, aug, blur_p=blur_p, solarize_p=solarize_p)


def view_of_box(image, box, key, size: int, aug, *, blur_p: float, solarize_p: float):
  """One view from a given crop box: crop-resize, flip, colour jitter, greyscale, blur, solarise.

  Args:
    image: uint8 [H, W, C], C = 1 or 3.
    box: (top, left, height, width) [4], int32 or float32 (a box scaled with its window), in
      pixels of `image`.
    key: a jax.random key (augment_view's: its first split is the crop's and is not used here).
    size, aug, blur_p, solarize_p: as augment_view.
  Returns:
    uint8 [size, size, 3].
  """
  _, k_flip, k_jitter, k_grey, k_blur, k_solar = jax.random.split(key, 6)
  x = crop_resize(image, box, size, aug.downscale) / 255.0
  if aug.flip:
    x = jnp.where(jax.random.uniform(k_flip) < 0.5, x[:, ::-1], x)
  x = _maybe(k_jitter, aug.jitter_p, lambda im, k: color_jitter(
      im, k, aug.brightness, aug.contrast, aug.saturation, aug.hue), x)
  if x.shape[-1] == 3:
    x = _maybe(k_grey, aug.grayscale_p, lambda im, _: to_grayscale(im), x)
  x = _maybe(k_blur, blur_p, lambda im, k: gaussian_blur(im, k, tuple(aug.blur_sigma)), x)
  x = _maybe(k_solar, solarize_p, lambda im, _: solarize(im), x)
  return to_uint8(x)


def view_keys(seed: int, positions, hosts):
  """One key per example from (seed, stream position, host) (rng_streams' view augmentation
  stream; the same triple always gives the same views).

  Args:
    seed: config.seed.
    positions: uint32 [B, 2], each example's position in its host's stream as (high, low) 32-bit
      words (split_positions), so positions past 2**32 need no 64-bit JAX.
    hosts: int32 [B], the process whose stream each example is from.
  Returns:
    jax.random keys [B].
  """
  # jax.random.key keeps a seed's low 32 bits: the high word is folded in, so no two seeds share.
  base = jax.random.fold_in(jax.random.key(seed % 2**32), seed >> 32)

  def one(position, host):
    k = jax.random.fold_in(jax.random.fold_in(base, position[0]), position[1])
    return jax.random.fold_in(k, host)
  return jax.vmap(one)(positions, hosts)


def split_positions(positions) -> np.ndarray:
  """int64 [B] stream positions (numpy) -> uint32 [B, 2] (high, low words) for view_keys."""
  positions = np.asarray(positions, np.int64)
  return np.stack([positions >> 32, positions & 0xFFFFFFFF], axis=-1).astype(np.uint32)


def _per_view(key, size: int, aug) -> list:
  """(key, side px, crop scale, blur_p, solarize_p) of each view of an example: the two global
  views (keys split from the example's), then the local crops (keys folded in apart from them)."""
  global_keys = jax.random.split(key, 2)
  views = [(global_keys[i], size, aug.crop_scale, float(aug.blur_p[i]), float(aug.solarize_p[i]))
           for i in range(2)]
  return views + [(jax.random.fold_in(key, rng_streams.LOCAL_CROP + j), int(aug.local_size),
                   aug.local_crop_scale, float(aug.local_blur_p), 0.0)
                  for j in range(int(aug.local_crops))]


def _views_dict(views: list, aug, local_used) -> dict:
  out = {"views": tuple(views[:2])}
  if aug.local_crops:
    local = views[2:]
    if local_used is not None:
      local = [jnp.where(jnp.reshape(j < local_used, (-1, 1, 1, 1)), v, jnp.zeros_like(v))
               for j, v in enumerate(local)]
    out["local_views"] = tuple(local)
  return out


def make_views(images, keys, size: int, aug, local_used=None) -> dict:
  """All the views of a batch for the recipe `aug` (views.make_views' contract, batched).

  Args:
    images: uint8 [B, H, W, C], C = 1 or 3.
    keys: jax.random keys [B], one per example (view_keys).
    size: the global views' side, px.
    aug: the recipe (config.aug).
    local_used: None (every local crop), or int32, a scalar or [B]: local crops from that index on
      are zeros (a 'crops<N>' stage; the made crops are unchanged).
  Returns:
    {'views': two uint8 [B, size, size, 3]} plus {'local_views': aug.local_crops uint8
    [B, aug.local_size, aug.local_size, 3]} when the recipe has local crops.
  """
  def one(image, key):
    return [augment_view(image, k, side, aug, crop_scale=scale, blur_p=blur, solarize_p=solar)
            for k, side, scale, blur, solar in _per_view(key, size, aug)]

  return _views_dict(jax.vmap(one)(images, keys), aug, local_used)


def views_from_windows(windows, boxes, keys, size: int, aug, local_used=None) -> dict:
  """The device's half of device-made views from a file source: each view cropped from its
  example's window at the box the host drew (views.make_windows), resized, flipped and coloured
  here (view_of_box). The crop boxes are the host's, so the crop statistics are the host path's;
  the flips and colours are this module's draws of the same distributions.

  Args:
    windows: uint8 [B, W, W, 3], make_windows' windows.
    boxes: float32 [B, V, 4] (top, left, height, width) in window pixels, V = 2 +
      aug.local_crops, the global views' first.
    keys: jax.random keys [B] (view_keys of the examples' stream positions and hosts).
    size, aug, local_used: as make_views.
  Returns:
    make_views' dict.
  Raises:
    ValueError: boxes' V is not 2 + aug.local_crops.
  """
  if boxes.shape[1] != 2 + int(aug.local_crops):
    raise ValueError(f"{boxes.shape[1]} boxes per example for a recipe with "
                     f"{2 + int(aug.local_crops)} views")

  def one(window, example_boxes, key):
    return [view_of_box(window, example_boxes[v], k, side, aug, blur_p=blur, solarize_p=solar)
            for v, (k, side, _, blur, solar) in enumerate(_per_view(key, size, aug))]

  return _views_dict(jax.vmap(one)(windows, boxes, keys), aug, local_used)
