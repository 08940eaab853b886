"""JPEG views decode only their crop windows (views.jpeg / augment.decode_jpeg_crop) and are the views
a whole decode gives: the crop boxes are the old sampler's, box for box; the views match the
whole-image (Pillow) path to within decoder / resize rounding; non-JPEG, grey, CMYK and EXIF-rotated
files keep working (through Pillow); the JPEG stream is deterministic and resumes exactly. Every file
is generated here (no fixtures, no network)."""
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import ExifTags, Image, ImageDraw

from conftest import tiny_config
from input_pipeline import augment, pipeline, recipes, sources, views

SIZE = 48        # view side in these tests


def photo(h, w, seed) -> np.ndarray:
  """uint8 [h, w, 3]: smooth colour gradients, a few filled shapes and noise (compresses like a
  photo, so JPEG chroma subsampling and the crop edges matter as they would on real data)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w] / max(h, w)
  base = np.stack([120 + 100 * np.sin(3 * yy + rng.uniform(0, 6)),
                   120 + 100 * np.cos(2 * xx + rng.uniform(0, 6)),
                   120 + 80 * np.sin(2 * (xx + yy))], axis=-1)
  image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(6):
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    draw.ellipse([x0, y0, x0 + rng.uniform(5, w / 2), y0 + rng.uniform(5, h / 2)],
                 fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (h, w, 3))
  return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg_bytes(array, **kw) -> bytes:
  buffer = io.BytesIO()
  mode = "L" if array.ndim == 2 else "RGB"
  Image.fromarray(array, mode).save(buffer, "JPEG", quality=kw.pop("quality", 90), **kw)
  return buffer.getvalue()


def old_box(image_shape, seed, scale, ratio):
  """The sampler call random_resized_crop made before crop decoding (on the decoded image)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return [int(v) for v in (begin[0], begin[1], size[0], size[1])]


def plain(aug):
  """The recipe with only crop + flip + resize left (the part the decoder feeds)."""
  aug = aug.copy_and_resolve_references()
  aug.jitter_p, aug.grayscale_p = 0.0, 0.0
  aug.blur_p, aug.solarize_p, aug.local_blur_p = (0.0, 0.0), (0.0, 0.0), 0.0
  return aug


def single_file_source(path, n=16) -> sources.ImageFiles:
  """One file n times: every element of a batch is a view of it (positions still differ)."""
  return sources.ImageFiles(np.array([os.fsencode(path)] * n), np.zeros(n, np.int32), ("a",))


def image_config(size=SIZE, recipe=recipes.byol_asymmetric, **kw):
  c = tiny_config()
  c.model.image_size = size
  c.aug = recipe(image_size=size, **kw)
  return c


def first_batch(source, cfg, decode_crops=True, batch=16, start_step=0):
  ds = pipeline.train_dataset(source, cfg, pipeline.HostShard(0, 1, batch), start_step,
                              decode_crops=decode_crops)
  return next(ds.as_numpy_iterator())


def test_crop_boxes_are_the_old_samplers_box_for_box():
  data = jpeg_bytes(photo(75, 100, 0), subsampling=0)   # 4:4:4: a crop decodes exactly
  whole = tf.io.decode_jpeg(data, channels=3, dct_method=augment.JPEG_DCT_METHOD)
  encoded = views.jpeg(tf.constant(data))
  np.testing.assert_array_equal(encoded.shape.numpy(), [75, 100, 3])
  for scale in ((0.08, 1.0), (0.25, 1.0), (0.05, 0.4)):
    for k in range(40):
      seed = tf.constant([k, 1000 + k], tf.int64)
      want = old_box(tf.shape(whole), seed, scale, (3 / 4, 4 / 3))
      from_shape = augment.sample_crop_box(encoded.shape, seed, scale, (3 / 4, 4 / 3))
      assert [int(v) for v in from_shape] == want, (scale, k)
      y, x, h, w = want
      crop = augment.decode_jpeg_crop(encoded.data, from_shape).numpy()
      np.testing.assert_array_equal(crop, whole.numpy()[y:y + h, x:x + w])
  # The boxes the views actually cut (two global + local crops, one shared decoded window) are
  # the old sampler's on each view's own crop seed.
  aug = recipes.dino_multicrop(image_size=SIZE, local_crops=3, local_size=16)
  seed = tf.constant([7, 8], tf.int64)
  specs = views._global_specs(seed, SIZE, aug) + views._local_specs(seed, aug)
  crops = views._crops(encoded, specs, aug)
  for spec, crop in zip(specs, crops):
    y, x, h, w = old_box(tf.shape(whole), spec.seeds[0], spec.crop_scale, tuple(aug.crop_ratio))
    np.testing.assert_array_equal(crop.numpy(), whole.numpy()[y:y + h, x:x + w])


@pytest.mark.parametrize("recipe", ["byol_asymmetric", "simclr"])
def test_decoded_crop_views_match_the_whole_image_path(tmp_path, recipe):
  path = str(tmp_path / "photo.jpg")
  with open(path, "wb") as f:
    f.write(jpeg_bytes(photo(150, 200, 1)))    # 4:2:0, Pillow's default, like most photos
  source = single_file_source(path)
  assert pipeline.jpeg_routes(source).all()
  cfg = image_config(recipe=getattr(recipes, recipe))
  # Crop + flip + resize only: the whole-image reference computed the old way, by hand.
  cfg_plain = image_config(recipe=getattr(recipes, recipe))
  cfg_plain.aug = plain(cfg_plain.aug)
  new = first_batch(source, cfg_plain)["views"]
  whole = tf.constant(pipeline.read_image(path), tf.float32) / 255.0
  for view_index, got in enumerate(new):
    for i in range(got.shape[0]):
      seed = pipeline._view_seed(cfg_plain, tf.constant(i, tf.int64), 0)
      s = tf.unstack(augment.split_seed(tf.unstack(augment.split_seed(seed, 2))[view_index], 6))
      y, x, h, w = old_box(tf.shape(whole), s[0], tuple(cfg_plain.aug.crop_scale), (3 / 4, 4 / 3))
      ref = tf.image.resize(whole[None, y:y + h, x:x + w], (SIZE, SIZE), antialias=True)[0]
      ref = augment.to_uint8(tf.image.stateless_random_flip_left_right(ref, s[1])).numpy()
      diff = np.abs(got[i].astype(int) - ref)
      assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8, (view_index, i, diff.mean())
  # The full recipe: crop decoding vs the whole-image (Pillow) path, same seeds.
  a, b = first_batch(source, cfg)["views"], first_batch(source, cfg, decode_crops=False)["views"]
  for x, y in zip(a, b):
    diff = np.abs(x.astype(int) - y)
    assert diff.mean() < 2.0, diff.mean()
    assert np.mean(diff == 0) > 0.5   # mostly identical pixels, not merely similar


def write(folder, name, image: Image.Image, **kw) -> str:
  path = os.path.join(folder, name)
  image.save(path, **kw)
  return path


def test_png_grey_cmyk_and_rotated_files_still_work(tmp_path):
  rgb = photo(60, 80, 2)
  folder = str(tmp_path)
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = 6
  files = {
      "rgb.jpg": (write(folder, "rgb.jpg", Image.fromarray(rgb), quality=90), True),
      "grey.jpg": (write(folder, "grey.jpg", Image.fromarray(rgb[..., 1], "L"), quality=90), True),
      "rgb.png": (write(folder, "rgb.png", Image.fromarray(rgb)), False),
      "grey.png": (write(folder, "grey.png", Image.fromarray(rgb[..., 0], "L")), False),
      "cmyk.jpg": (write(folder, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK")), False),
      "turned.jpg": (write(folder, "turned.jpg", Image.fromarray(rgb), exif=exif), False),
      "jpeg_named.png": (write(folder, "jpeg_named.png", Image.fromarray(rgb), format="JPEG"),
                         True),
  }
  all_files = sources.ImageFiles(np.array([os.fsencode(p) for p, _ in files.values()]),
                                 np.zeros(len(files), np.int32), ("a",))
  want = np.array([route for _, route in files.values()])
  np.testing.assert_array_equal(pipeline.jpeg_routes(all_files), want)   # header only
  verified = pipeline.verify_image_files(all_files, "skip")              # whole decode + TF check
  np.testing.assert_array_equal(verified.jpeg, want)

  # One batch holds every file once (same permutation on both paths): TF crop decoding where
  # routed, Pillow elsewhere, against Pillow everywhere. No random greyscale, so exactly the grey
  # files give grey views. A TF-decoded turned.jpg would show unrotated (80 x 60, not 60 x 80).
  cfg = image_config()
  cfg.aug.grayscale_p = 0.0
  shard = pipeline.HostShard(0, 1, len(files))
  new = next(pipeline.train_dataset(verified, cfg, shard).as_numpy_iterator())["views"]
  old = next(pipeline.train_dataset(verified, cfg, shard, decode_crops=False)
             .as_numpy_iterator())["views"]
  for a, b in zip(new, old):
    assert a.shape == (len(files), SIZE, SIZE, 3) and a.dtype == np.uint8
    for x, y in zip(a, b):
      assert np.abs(x.astype(int) - y).mean() < 2.0
    grey = [np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
            for x in a]
    assert sum(grey) == 2   # grey.jpg (TF, channels=3 replicates) and grey.png (Pillow)


def test_same_seed_same_jpeg_stream_other_seed_other_views_and_resume_replays(tmp_path):
  folder = tmp_path / "data"
  for split in ("train", "test"):
    for c in ("a", "b"):
      os.makedirs(folder / split / c)
      for i in range(10 if split == "train" else 1):
        with open(folder / split / c / f"{i}.jpg", "wb") as f:
          f.write(jpeg_bytes(photo(40 + 4 * i, 60, 10 * i + ord(c))))
  cfg = image_config()
  with cfg.unlocked():
    cfg.data.source, cfg.data.dir = "image_folder", str(folder)
  source = pipeline.load_source(cfg, "train")
  assert source.num_examples == 20 and source.jpeg.all()
  shard = pipeline.HostShard(0, 1, 8)   # 2 steps per epoch: 5 steps cross two epoch boundaries

  def take(config, k, start_step=0):
    ds = pipeline.train_dataset(source, config, shard, start_step)
    return [b for _, b in zip(range(k), ds.as_numpy_iterator())]

  full = take(cfg, 5)
  again = take(cfg, 5)
  resumed = take(cfg, 2, start_step=3)
  for x, y in zip(full, again):
    for a, b in zip(x["views"], y["views"]):
      np.testing.assert_array_equal(a, b)
  for x, y in zip(full[3:], resumed):
    for a, b in zip(x["views"], y["views"]):
      np.testing.assert_array_equal(a, b)
  other = take(_with_seed(cfg, 1), 1)[0]
  assert not np.array_equal(other["views"][0], full[0]["views"][0])
  assert not np.array_equal(full[0]["views"][0], full[0]["views"][1])   # two different views


def _with_seed(cfg, seed):
  c = cfg.copy_and_resolve_references()
  c.seed = seed
  return c


def tfds_folder_builder(root):
  """A TFDS builder (registered as `jpeg_crop_test_images`) over ROOT/<class>/*: built offline."""
  import tensorflow_datasets as tfds

  class JpegCropTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=sorted(os.listdir(root)))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for name in sorted(os.listdir(root)):
        for file in sorted(os.listdir(os.path.join(root, name))):
          yield f"{name}/{file}", {"image": os.path.join(root, name, file), "label": name}

  return JpegCropTestImages


def test_tfds_jpegs_decode_crops_like_whole_images(tmp_path):
  for c in ("a", "b"):
    os.makedirs(tmp_path / "images" / c)
    for i in range(8):
      image = photo(50, 70, 20 * i + ord(c))
      if i % 4:
        with open(tmp_path / "images" / c / f"{i}.jpg", "wb") as f:
          f.write(jpeg_bytes(image))
      else:   # a PNG among the JPEGs (TFDS keeps its bytes): decoded whole, as TFDS would
        Image.fromarray(image).save(tmp_path / "images" / c / f"{i}.png")
  builder_class = tfds_folder_builder(str(tmp_path / "images"))
  builder_class(data_dir=str(tmp_path / "tfds")).download_and_prepare()
  cfg = image_config()
  with cfg.unlocked():
    cfg.data.source, cfg.data.dir = "tfds", str(tmp_path / "tfds")
    cfg.data.tfds_name, cfg.data.shuffle_buffer = "jpeg_crop_test_images", 16
    cfg.data.tfds_splits.test = "train"
  source = sources.load(cfg, "train")
  assert source.num_examples == 16
  shard = pipeline.HostShard(0, 1, 16)
  new = next(pipeline.train_dataset(source, cfg, shard).as_numpy_iterator())["views"]
  old = next(pipeline.train_dataset(source, cfg, shard, decode_crops=False)
             .as_numpy_iterator())["views"]
  for a, b in zip(new, old):   # same order, same boxes; the old path decoded with TF's fast IDCT
    assert a.shape == (16, SIZE, SIZE, 3)
    for x, y in zip(a, b):
      assert np.abs(x.astype(int) - y).mean() < 3.0
