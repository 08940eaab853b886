"""The on-device views (input_pipeline/device_views.py) against the tf.data ones (augment.py,
views.py): the crop sampler in distribution, each op on the same draw, whole views in distribution,
and the batch contract (shapes, determinism, local crops)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import augment, recipes, views
from input_pipeline import device_views as dv


def ks_statistic(a, b) -> float:
  """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
  grid = np.union1d(a, b)
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
  return float(np.abs(cdf(a) - cdf(b)).max())


# Critical KS value at alpha = 1e-3 for two samples of N: 1.95 * sqrt(2 / N).
N = 3000
KS_CRITICAL = 1.95 * np.sqrt(2 / N)


def host_boxes(height, width, scale, n=N):
  return np.array([[int(v) for v in augment.sample_crop_box(
      tf.constant([height, width, 1]), tf.constant([i, 11]), scale, (3 / 4, 4 / 3))]
      for i in range(n)])


@pytest.mark.parametrize("height,width,scale", [(32, 40, (0.08, 1.0)), (32, 32, (0.05, 0.4)),
                                                (24, 18, (0.4, 1.0))])
def test_crop_boxes_are_drawn_as_tensorflow_draws_them(height, width, scale):
  keys = jax.random.split(jax.random.key(3), N)
  device = np.asarray(jax.vmap(lambda k: dv.sample_crop_box(k, height, width, scale))(keys))
  host = host_boxes(height, width, scale)
  for i, name in enumerate(("top", "left", "height", "width")):
    assert ks_statistic(device[:, i], host[:, i]) < KS_CRITICAL, name
  area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
  assert ks_statistic(area(device), area(host)) < KS_CRITICAL
  # Inside the image, in the area range (but the whole-image fallback), and TF's edge rule: a crop
  # smaller than the image never reaches its bottom or right edge.
  y, x, h, w = device.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  whole = (h == height) & (w == width)
  assert ((area(device) >= scale[0] - 1e-6) & (area(device) <= scale[1] + 1e-6) | whole).all()
  assert not ((y + h == height) & (h < height)).any()
  assert not ((x + w == width) & (w < width)).any()


@pytest.mark.parametrize("box", [(3, 5, 20, 14), (0, 0, 32, 32), (10, 2, 7, 9), (1, 0, 31, 6)])
@pytest.mark.parametrize("size", [16, 40])
@pytest.mark.parametrize("downscale", ["antialias", "bilinear"])
def test_crop_resize_is_the_host_crop_then_resize(box, size, downscale):
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  host = augment.resize_crop(augment.crop_image(tf.constant(image), augment.CropBox(*box)),
                             size, downscale).numpy() * 255.0
  device = np.asarray(dv.crop_resize(jnp.asarray(image), jnp.asarray(box), size, downscale))
  np.testing.assert_allclose(device, host, atol=2e-3)   # levels 0..255: float rounding only


def host_factor(seed, low, high):
  """The factor a host colour op draws from `seed` (augment.adjust_*: one stateless uniform)."""
  return float(tf.random.stateless_uniform([], seed, low, high))


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_ops_compute_what_the_host_ops_compute(channels):
  """Each host op against the device op at the factor the host op drew, for strengths that move
  the pixels; blur at a fixed sigma (a degenerate range), both clipping and the kernel cut."""
  image = np.random.default_rng(1).uniform(size=(16, 16, channels)).astype(np.float32)
  x, t = jnp.asarray(image), tf.constant(image)
  for i, s in enumerate((0.4, 0.8)):
    seed = tf.constant([i, 2])
    f = host_factor(seed, 1 - s, 1 + s)
    for name in ("brightness", "contrast", "saturation"):
      host = getattr(augment, f"adjust_{name}")(t, seed, s).numpy()
      np.testing.assert_allclose(np.asarray(getattr(dv, f"{name}_by")(x, f)), host, atol=1e-5,
                                 err_msg=name)
    if channels == 3:
      delta = host_factor(seed, -s / 2, s / 2)
      np.testing.assert_allclose(np.asarray(dv.hue_by(x, delta)),
                                 augment.adjust_hue(t, seed, s / 2).numpy(), atol=1e-5)
  key = jax.random.key(7)
  for sigma in (0.3, 1.2):
    host = augment.gaussian_blur(t, tf.constant([1, 2]), (sigma, sigma), 0.5).numpy()
    np.testing.assert_allclose(np.asarray(dv.gaussian_blur(x, key, (sigma, sigma), 0.5)), host,
                               atol=1e-5)
  np.testing.assert_allclose(np.asarray(dv.solarize(x)), augment.solarize(t).numpy(), atol=0)
  np.testing.assert_allclose(np.asarray(dv.to_grayscale(x)), augment.to_grayscale(t).numpy(),
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dv.to_uint8(x)),
                                views.to_rgb_uint8(t).numpy())
  # The random wrappers draw in the documented range.
  draws = [float(dv._uniform(k, 0.6, 1.4)) for k in jax.random.split(key, 200)]
  assert 0.6 <= min(draws) < 0.7 and 1.3 < max(draws) <= 1.4


def fmnist_like(n, seed=0):
  """Garment-like grey images: a bright blob on black, 32 x 32, uint8."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:32, :32]
  cy, cx = rng.uniform(10, 22, (2, n, 1, 1))
  r = rng.uniform(5, 11, (n, 1, 1))
  level = rng.uniform(120, 255, (n, 1, 1))
  blob = level * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)) ** 2)
  return np.clip(blob + rng.normal(0, 8, blob.shape), 0, 255).astype(np.uint8)[..., None]


@pytest.mark.parametrize("recipe", ["byol_asymmetric", "simclr"])
def test_views_match_the_host_views_in_distribution(recipe):
  aug = getattr(recipes, recipe)(image_size=32)
  n = 1200
  images = fmnist_like(n)
  keys = jax.random.split(jax.random.key(0), n)
  device = jax.jit(lambda im, k: dv.make_views(im, k, 32, aug))(jnp.asarray(images), keys)
  device = [np.asarray(v) for v in device["views"]]
  seeds = np.stack([np.arange(n), np.full(n, 3)], axis=-1).astype(np.int64)
  made = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
      lambda im, sd: views.make_views(im, sd, 32, aug)["views"]).batch(n).get_single_element()
  host = [v.numpy() for v in made]
  crit = 1.95 * np.sqrt(2 / n)
  for j in range(2):   # each view's own statistics (the two views differ: blur / solarise)
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)),
                 lambda v: (v > 127).mean((1, 2, 3)),
                 lambda v: np.abs(np.diff(v.astype(np.float32), axis=2)).mean((1, 2, 3))):
      assert ks_statistic(stat(device[j]), stat(host[j])) < crit, (j, stat)


def test_make_views_batch_contract():
  aug = recipes.dino_multicrop(image_size=32, local_crops=3, local_size=16)
  images = jnp.asarray(fmnist_like(4))
  positions = dv.split_positions(np.array([0, 1, 2**33 + 2, 3]))
  keys = dv.view_keys(5, positions, np.zeros(4, np.int32))
  out = dv.make_views(images, keys, 32, aug)
  assert set(out) == {"views", "local_views"} and len(out["local_views"]) == 3
  assert all(v.shape == (4, 32, 32, 3) and v.dtype == jnp.uint8 for v in out["views"])
  assert all(v.shape == (4, 16, 16, 3) for v in out["local_views"])
  again = dv.make_views(images, dv.view_keys(5, positions, np.zeros(4, np.int32)), 32, aug)
  np.testing.assert_array_equal(out["views"][0], again["views"][0])    # same keys, same views
  other = dv.make_views(images, dv.view_keys(5, positions, np.ones(4, np.int32)), 32, aug)
  assert not np.array_equal(out["views"][0], other["views"][0])        # another host: others
  assert not np.array_equal(out["views"][0], out["views"][1])
  few = dv.make_views(images, keys, 32, aug, local_used=jnp.int32(1))
  np.testing.assert_array_equal(few["local_views"][0], out["local_views"][0])
  assert not np.asarray(few["local_views"][1]).any() and not np.asarray(few["local_views"][2]).any()
  np.testing.assert_array_equal(few["views"][1], out["views"][1])
