"""Augmentation recipes and multi-crop views: the named recipes' settings, each recipe's views the
same eagerly and inside tf.data, local-crop shapes and counts through the batching pipeline."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from input_pipeline import pipeline, recipes, views


def test_recipes_carry_the_published_settings():
  s = recipes.simclr(strength=1.0)
  assert s.crop_scale == (0.08, 1.0) and s.jitter_p == 0.8 and s.grayscale_p == 0.2
  assert (s.brightness, s.contrast, s.saturation, s.hue) == pytest.approx((0.8, 0.8, 0.8, 0.2))
  assert recipes.simclr(strength=0.5).hue == pytest.approx(0.1)
  b = recipes.byol_asymmetric()
  assert b.blur_p == (1.0, 0.1) and b.solarize_p == (0.0, 0.2)
  d = recipes.dino_multicrop(local_crops=6, local_size=96)
  assert d.crop_scale == (0.4, 1.0) and d.local_crop_scale == (0.05, 0.4)
  assert (d.local_crops, d.local_size, d.local_blur_p) == (6, 96, 0.5)
  # Blur sigma is in pixels of the dataset's images: 0.1-2.0 at 224 px, scaled for 32 px.
  assert recipes.byol_asymmetric(224).blur_sigma == pytest.approx((0.1, 2.0))
  assert recipes.byol_asymmetric(32).blur_sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))


RECIPES = {
    "simclr": lambda: recipes.simclr(strength=1.0, image_size=32),
    "byol_asymmetric": lambda: recipes.byol_asymmetric(image_size=32),
    "dino_multicrop": lambda: recipes.dino_multicrop(image_size=32, local_crops=3, local_size=16),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("channels", [1, 3])
def test_recipe_views_same_eagerly_and_in_tf_data(name, channels):
  aug = RECIPES[name]()
  image = tf.constant(np.random.default_rng(0).uniform(size=(32, 32, channels)), tf.float32)
  seed = tf.constant([5, 6], tf.int64)

  def make(im, sd):
    return views.make_views(im, sd, 32, aug)

  eager = make(image, seed)
  in_graph = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(make)))
  assert set(eager) == ({"views", "local_views"} if aug.local_crops else {"views"})
  for key in eager:
    for a, b in zip(eager[key], in_graph[key]):
      assert a.dtype == tf.uint8 and a.shape[-1] == 3
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  v0, v1 = (v.numpy() for v in eager["views"])
  assert v0.shape == (32, 32, 3) and not np.array_equal(v0, v1)
  if aug.local_crops:
    assert len(eager["local_views"]) == 3
    assert all(v.shape == (16, 16, 3) for v in eager["local_views"])


def test_local_crops_leave_the_global_views_unchanged():
  image = tf.constant(np.random.default_rng(1).uniform(size=(32, 32, 1)), tf.float32)
  seed = tf.constant([7, 8], tf.int64)
  with_local = recipes.dino_multicrop(image_size=32, local_crops=2, local_size=16)
  without = recipes.dino_multicrop(image_size=32, local_crops=0, local_size=16)
  a = views.make_views(image, seed, 32, with_local)
  b = views.make_views(image, seed, 32, without)
  assert "local_views" not in b
  for x, y in zip(a["views"], b["views"]):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
  l0, l1 = (v.numpy() for v in a["local_views"])
  assert not np.array_equal(l0, l1)


def test_multicrop_batches_have_local_views_of_their_own_size():
  cfg = tiny_config(recipe="dino")
  cfg.aug.local_crops = 3
  cfg.aug.local_size = 12
  images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
  ds = pipeline.train_dataset(images, cfg, pipeline.HostShard(0, 1, 16))
  batch = next(ds.as_numpy_iterator())
  assert len(batch["views"]) == 2 and len(batch["local_views"]) == 3
  assert all(v.shape == (16, 32, 32, 3) and v.dtype == np.uint8 for v in batch["views"])
  assert all(v.shape == (16, 12, 12, 3) and v.dtype == np.uint8 for v in batch["local_views"])
  # Resumable like the two-view stream: the same position gives the same local crops.
  again = next(pipeline.train_dataset(images, cfg, pipeline.HostShard(0, 1, 16)).as_numpy_iterator())
  np.testing.assert_array_equal(batch["local_views"][2], again["local_views"][2])


def test_a_stage_on_fewer_local_crops_makes_only_those_and_the_same_ones():
  cfg = tiny_config(recipe="dino")
  cfg.aug.local_crops = 3
  cfg.aug.local_size = 12
  images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
  shard = pipeline.HostShard(0, 1, 16)
  steps = 4   # 64 examples / 16: one epoch, so no reshuffle between the two streams' steps
  full = list(pipeline.train_dataset(images, cfg, shard).take(steps).as_numpy_iterator())
  # Steps 0-1 train on 1 local crop, step 2 on none, step 3 on 2.
  table = ((2, 1), (3, 0), (4, 2))
  fewer = list(pipeline.train_dataset(images, cfg, shard, local_crops_by_step=table)
               .take(steps).as_numpy_iterator())
  used = [1, 1, 0, 2]
  for step, (a, b) in enumerate(zip(full, fewer)):
    for x, y in zip(a["views"], b["views"]):
      np.testing.assert_array_equal(x, y)
    for j, (x, y) in enumerate(zip(a["local_views"], b["local_views"])):
      if j < used[step]:
        np.testing.assert_array_equal(x, y)   # made: exactly the crops of the full stream
        assert x.any()
      else:
        assert y.shape == x.shape and not y.any(), (step, j)   # skipped: zeros
  # Resuming inside the table reads the right stage for each step.
  resumed = next(pipeline.train_dataset(images, cfg, shard, start_step=2,
                                        local_crops_by_step=table).as_numpy_iterator())
  assert not any(v.any() for v in resumed["local_views"])
