"""View recipes: an image + seed -> the augmented views an objective consumes (uint8, 3 channels).

Two global views (MoCo-v3, SimCLR, DINO), plus, for DINO's multi-crop, `aug.local_crops` local crops
at `aug.local_size`. Which ops and probabilities: `config.aug`, usually built by recipes.py.

The image is either decoded pixels (float [H, W, C] in [0, 1], or uint8) or a `Jpeg`: the encoded
bytes. For a Jpeg the views' boxes are drawn from the JPEG's shape (tf.image.extract_jpeg_shape)
with the same sampler and seeds as for decoded pixels, so both give the same boxes; then only the
smallest window holding all the boxes is decoded (tf.image.decode_and_crop_jpeg, once per image:
decoding each box separately re-reads the entropy-coded rows above every box, which for two views
costs as much as one whole decode), and each view slices its box out of it. Up to the decoder's
rounding at the window's edges (chroma upsampling), a Jpeg gives the views its decoded pixels give.

Each view: crop -> flip (both at the crop's size, uint8 when the source is) -> resize to the view
size -> colour ops on the small image -> uint8.
"""
from __future__ import annotations

from typing import NamedTuple

from input_pipeline.tf_runtime import tf

from input_pipeline import augment
from vit_accel import rng_streams


class Jpeg(NamedTuple):
  """An encoded JPEG whose views decode only their crop windows (build it with `jpeg`)."""
  data: tf.Tensor      # tf.string scalar, the file's bytes
  shape: tf.Tensor     # int32 [3]: height, width, channels as decoded (channels = `channels`)
  channels: int        # 3 (grey JPEGs replicated to RGB) or 1


def jpeg(data, channels: int = 3) -> Jpeg:
  """Wrap JPEG bytes (tf.string scalar) for make_views; reads only the header (its size).

  Raises (when the tf.data iterator reaches it) tf.errors.InvalidArgumentError for bytes that are
  not a JPEG libjpeg can parse."""
  hw = tf.image.extract_jpeg_shape(data)[:2]
  return Jpeg(data, tf.concat([hw, [channels]], axis=0), channels)


class _ViewSpec(NamedTuple):
  seeds: list          # six int [2] seeds: crop, flip, jitter, greyscale, blur, solarise
  size: int
  crop_scale: tuple
  blur_p: float
  solarize_p: float


def _spec(seed, size, crop_scale, blur_p, solarize_p) -> _ViewSpec:
  return _ViewSpec(tf.unstack(augment.split_seed(seed, 6)), int(size), tuple(crop_scale),
                   float(blur_p), float(solarize_p))


def _boxes(image, specs, aug) -> list:
  """Each view's crop box (augment.sample_crop_box from the view's crop seed), in image pixels."""
  ratio = tuple(aug.crop_ratio)
  shape = image.shape if isinstance(image, Jpeg) else tf.shape(image)
  return [augment.sample_crop_box(shape, spec.seeds[0], spec.crop_scale, ratio) for spec in specs]


def _window(image, boxes):
  """(the smallest window of `image` holding every box, the boxes relative to it). A Jpeg decodes
  only that window (rows below it and columns beside it are never decoded)."""
  top = tf.reduce_min([b.y for b in boxes])
  left = tf.reduce_min([b.x for b in boxes])
  bottom = tf.reduce_max([b.y + b.height for b in boxes])
  right = tf.reduce_max([b.x + b.width for b in boxes])
  box = augment.CropBox(top, left, bottom - top, right - left)
  window = (augment.decode_jpeg_crop(image.data, box, image.channels) if isinstance(image, Jpeg)
            else augment.crop_image(image, box))
  return window, [augment.CropBox(b.y - top, b.x - left, b.height, b.width) for b in boxes]


def _crops(image, specs, aug) -> list:
  """Each view's random crop, at the crop's own size (uint8, or the image's dtype). A Jpeg is
  decoded once, over the smallest window holding every view's box; each view then slices its box
  out of that window."""
  boxes = _boxes(image, specs, aug)
  if not isinstance(image, Jpeg):
    return [augment.crop_image(image, box) for box in boxes]
  window, inside = _window(image, boxes)
  return [augment.crop_image(window, box) for box in inside]


def _finish_view(crop, spec: _ViewSpec, aug):
  """A view's crop -> flip (still at crop size: cheaper), resize to spec.size, colour jitter,
  greyscale, blur, solarise -> uint8 [spec.size, spec.size, 3]."""
  s = spec.seeds
  if aug.flip:
    crop = augment.random_flip(crop, s[1])
  x = augment.resize_crop(crop, spec.size, aug.downscale)
  x = augment.random_apply(
      lambda im, sd: augment.color_jitter(im, sd, aug.brightness, aug.contrast, aug.saturation,
                                          aug.hue), x, s[2], aug.jitter_p)
  if aug.grayscale_p > 0 and x.shape[-1] == 3:
    x = augment.random_apply(lambda im, _: augment.to_grayscale(im), x, s[3], aug.grayscale_p)
  sigma = tuple(aug.blur_sigma)
  x = augment.random_apply(lambda im, sd: augment.gaussian_blur(im, sd, sigma), x, s[4],
                           spec.blur_p)
  x = augment.random_apply(lambda im, _: augment.solarize(im), x, s[5], spec.solarize_p)
  return to_rgb_uint8(x)


def augment_view(image, seed, size: int, aug, *, crop_scale, blur_p: float, solarize_p: float):
  """One augmented view: random resized crop to `size`, flip, colour jitter, greyscale, blur,
  solarise, with the `aug` recipe's strengths (SimCLR, Chen et al. 2020; BYOL, Grill et al.
  2020); crop scale and blur / solarise probabilities are per view (BYOL / MoCo-v3 asymmetry, DINO's
  local crops).

  Args:
    image: float32 [H, W, C] in [0, 1], uint8 [H, W, C], or a Jpeg (decodes only this view's
      box); C = 1 or 3.
    seed: int [2].
  Returns:
    uint8 [size, size, 3].
  """
  spec = _spec(seed, size, crop_scale, blur_p, solarize_p)
  return _finish_view(_crops(image, [spec], aug)[0], spec, aug)


def _global_specs(seed, size: int, aug) -> list:
  s = tf.unstack(augment.split_seed(seed, 2))
  return [_spec(s[i], size, aug.crop_scale, aug.blur_p[i], aug.solarize_p[i]) for i in range(2)]


def _local_specs(seed, aug) -> list:
  """Local crops' specs: seeds folded from the view seed apart from the global views', so adding
  local crops leaves the global views' draws unchanged."""
  return [_spec(tf.random.experimental.stateless_fold_in(seed, rng_streams.LOCAL_CROP + j),
                aug.local_size, aug.local_crop_scale, aug.local_blur_p, 0.0)
          for j in range(aug.local_crops)]


def _views(image, specs, aug) -> tuple:
  return tuple(_finish_view(crop, spec, aug) for crop, spec in zip(_crops(image, specs, aug), specs))


def to_rgb_uint8(image):
  """float [H, W, C] in [0, 1], C = 1 or 3 -> uint8 [H, W, 3] (grey tiled)."""
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return augment.to_uint8(image)


def two_views(image, seed, size: int, aug):
  """Two independently augmented global views of one image (MoCo-v3, SimCLR, DINO)."""
  return _views(image, _global_specs(seed, size, aug), aug)


def local_views(image, seed, aug):
  """DINO's local crops: `aug.local_crops` small crops (scale `aug.local_crop_scale`) at
  `aug.local_size`, blur with `aug.local_blur_p`, no solarisation. Their seeds are folded from the
  view seed apart from the global views', so adding local crops leaves the global views unchanged
  (for a Jpeg, up to the decoder's rounding at the edge of the shared decoded window)."""
  return _views(image, _local_specs(seed, aug), aug)


def make_views(image, seed, size: int, aug, local_used=None) -> dict:
  """All the views of one image for the recipe `aug` (SimCLR, BYOL / MoCo-v3, DINO multi-crop).

  Args:
    image: float32 [H, W, C] in [0, 1], uint8 [H, W, C], or a Jpeg (jpeg(bytes): decoded once,
      over the smallest window holding all the views' boxes); C = 1 or 3.
    seed: int [2], the example's view seed (the same seed always gives the same views).
    size: global view side, px.
    aug: the recipe (config.aug).
    local_used: None (every local crop is made), or an int32 scalar tensor: only the first
      `local_used` local crops are made, the others are zeros of the same shape (a stage that
      trains on fewer crops, 'crops<N>', does not pay for the rest). The made crops are the same
      as with None: every crop's box is still drawn (and a JPEG still decodes the window of all).
  Returns:
    {'views': two uint8 [size, size, 3]} plus {'local_views': aug.local_crops uint8
    [aug.local_size, aug.local_size, 3]} when the recipe has local crops.
  """
  specs = _global_specs(seed, size, aug) + _local_specs(seed, aug)
  crops = _crops(image, specs, aug)
  views = [_finish_view(crop, spec, aug) for crop, spec in zip(crops[:2], specs[:2])]
  for j, (crop, spec) in enumerate(zip(crops[2:], specs[2:])):
    if local_used is None:
      views.append(_finish_view(crop, spec, aug))
    else:
      views.append(tf.cond(j < local_used, lambda c=crop, sp=spec: _finish_view(c, sp, aug),
                           lambda sp=spec: tf.zeros([sp.size, sp.size, 3], tf.uint8)))
  out = {"views": tuple(views[:2])}
  if aug.local_crops:
    out["local_views"] = tuple(views[2:])
  return out


def make_windows(image, seed, size: int, aug, window_size: int) -> dict:
  """The host's half of device-made views (data.augment_on='device' on a file source): every view's
  crop box drawn exactly as make_views draws it (same sampler, same seeds: the same crop
  statistics), and the one window of the image holding them all, decoded once; the accelerator
  then crops, resizes, flips and colours (device_views.views_from_windows). Decoding is all that
  is left to the host.

  The window is at most window_size px along each side; the batch pads it to window_size x
  window_size (pipeline.train_dataset: padding while batching is one copy, a tf.pad here would be
  another), and the device's resize weights cover only the pixels whose centres a box covers, so
  the padding never reaches a view. A window larger than window_size along a side (images over
  window_size px, crops spanning most of them) is first shrunk on the host to fit (antialiased
  bilinear, whatever aug.downscale says; aspect kept) and its boxes scaled with it (ends clipped
  to the shrunk window): those views are resized twice, and a crop that the shrink takes below
  the view's size loses resolution (a 4000 px photo's window at 512 px: a quarter-side crop
  arrives at ~128 px and is enlarged to 224). Pick window_size for the data: at least the
  largest image side where that is affordable (ImageNet's images are mostly <= 500 px).

  Args:
    image: as make_views (float32 [H, W, C] in [0, 1], uint8 [H, W, C], or a Jpeg); C = 1 or 3.
    seed: int [2], the example's view seed.
    size: global view side, px.
    aug: the recipe (config.aug).
    window_size: the window's side, px (config.data.window_size).
  Returns:
    {'window': uint8 [h, w, 3], h, w <= window_size, 'boxes': float32 [2 + aug.local_crops, 4]
    (top, left, height, width) in window pixels, the global views' first, then the local crops'}.
  """
  specs = _global_specs(seed, size, aug) + _local_specs(seed, aug)
  window, boxes = _window(image, _boxes(image, specs, aug))
  if window.dtype != tf.uint8:
    window = augment.to_uint8(window)
  if window.shape[-1] == 1:
    window = tf.tile(window, [1, 1, 3])
  boxes = tf.cast(tf.stack([tf.stack(list(b)) for b in boxes]), tf.float32)
  hw = tf.shape(window)[:2]
  scale = tf.minimum(1.0, window_size / tf.cast(tf.reduce_max(hw), tf.float32))

  def shrink():
    new_hw = tf.maximum(1, tf.minimum(window_size, tf.cast(
        tf.round(tf.cast(hw, tf.float32) * scale), tf.int32)))
    small = tf.image.resize(window[None], new_hw, method="bilinear", antialias=True)[0]
    factors = tf.cast(new_hw, tf.float32) / tf.cast(hw, tf.float32)
    scaled = boxes * tf.concat([factors, factors], 0)
    # Float rounding may put a box's end an ulp past the shrunk window (into the batch's padding).
    limit = tf.cast(new_hw, tf.float32)
    ends = tf.minimum(scaled[:, :2] + scaled[:, 2:], limit)
    return (tf.cast(tf.round(tf.clip_by_value(small, 0.0, 255.0)), tf.uint8),
            tf.concat([scaled[:, :2], ends - scaled[:, :2]], 1))

  window, boxes = tf.cond(scale < 1.0, shrink, lambda: (window, boxes))
  window.set_shape([None, None, 3])
  return {"window": window, "boxes": boxes}
