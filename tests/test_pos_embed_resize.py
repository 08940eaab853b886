"""Position-embedding resize: every learned vector reaches every grid the recipes run at;
upsampling and factor-2 downsampling are what they were (bilinear, half-pixel centres)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import (
  fmnist_dino,
  fmnist_mocov3,
  fmnist_simclr,
  imagenet_common,
  imagenet_dino_vit_b16,
  imagenet_mocov3_vit_b16,
  imagenet_simclr_vit_b16,
)
from vit_accel import compression, step_plan, train_step
from vit_accel.compression import Strategy
from vit_accel.models.vit import VisionTransformer

# Every shipped recipe with every argument its get_config accepts.
RECIPES = ([(m, arg) for m in (fmnist_mocov3, fmnist_simclr, fmnist_dino)
            for arg in (None, "smoke")]
           + [(m, arg) for m in (imagenet_mocov3_vit_b16, imagenet_simclr_vit_b16,
                                 imagenet_dino_vit_b16)
              for arg in (None, *imagenet_common.ARGS)])

# The paper's flexible patch sizes on 224 px with base patch 16.
PAPER_PATCHES = (20, 24, 30, 40)


def _branch_strategies(config):
  """Every BranchStrategies a recipe can run: each schedule preset, the recipe's own schedule, and
  the cost / grad_error / online candidates (each with full|full first), as the code parses them."""
  m, bucket = config.model, config.compression.bucket
  out = []
  for preset in step_plan.presets(m.patch_size):
    out += [st.strategies for st in step_plan.parse_schedule(preset, bucket, m)]
  out += [st.strategies for st in step_plan.schedule_stages(config)]
  for key in ("compression.cost_candidates", "grad_error.candidates", "online.candidates"):
    section, name = key.split(".")
    out += compression.full_then_candidates(config[section][name], bucket, m, key)
  return out


def _recipe_grids(config):
  """{(base grid, layout grid)} over every strategy and view side of a recipe: both branches on
  model.image_size, and the gradient branch on aug.local_size when the recipe has local crops (the
  DINO student's local views; objectives/dino.py)."""
  m = config.model
  base = m.image_size // m.patch_size
  grids = set()
  for s in _branch_strategies(config):
    grids.add((base, s.query.layout(m.image_size, m.patch_size).grid))
    grids.add((base, s.key.layout(m.image_size, m.patch_size).grid))
    if train_step.num_local_crops(config):
      grids.add((base, s.local_strategy.layout(config.aug.local_size, m.patch_size).grid))
  return grids


def _all_grids():
  grids = set()
  for module, arg in RECIPES:
    grids |= _recipe_grids(module.get_config(arg))
  # The paper's patch sizes through the same layout arithmetic (round(224 / p): 11, 9, 7, 6), plus
  # grid 5 (floor(224 / 40)) and DINO's 96 px local crop at patch 16 (14 -> 6).
  grids |= {(14, Strategy(patch_size=p).layout(224, 16).grid) for p in PAPER_PATCHES}
  grids |= {(14, 5), (14, 6)}
  return sorted(grids)


ALL_GRIDS = _all_grids()


def _unreached(resize, g, grid, dim=8, seed=0):
  """Source vectors whose gradient of sum(resize(pos) * r), r random, is exactly zero."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  pos = jax.random.normal(k1, (1, g * g, dim))
  r = jax.random.normal(k2, (1, grid * grid, dim))
  grad = jax.grad(lambda p: jnp.sum(resize(p, grid) * r))(pos)
  return np.flatnonzero(np.abs(np.asarray(grad[0])).sum(-1) == 0)


def _old_bilinear(pos, grid):
  """The resize before area downsampling: plain bilinear at every factor."""
  g = int(round(pos.shape[1] ** 0.5))
  img = jax.image.resize(pos.reshape(1, g, g, -1), (1, grid, grid, pos.shape[-1]), "linear",
                         antialias=False)
  return img.reshape(1, grid * grid, -1)


def test_enumeration_covers_the_shrinking_grids_of_the_recipes():
  # Not a hand list: these come out of the configs; the ones below must be among them.
  assert {(8, 8), (8, 4), (8, 2), (14, 14), (14, 7), (14, 6), (14, 3)} <= set(ALL_GRIDS)
  assert {(14, 11), (14, 9), (14, 7), (14, 6), (14, 5)} <= set(ALL_GRIDS)
  assert all(g in (8, 14) for g, _ in ALL_GRIDS)


@pytest.mark.parametrize("g,grid", ALL_GRIDS, ids=[f"{g}to{n}" for g, n in ALL_GRIDS])
def test_every_position_vector_gets_a_gradient(g, grid):
  out = compression.resize_pos_embed(jnp.zeros((1, g * g, 8)), grid)
  assert out.shape == (1, grid * grid, 8)
  assert list(_unreached(compression.resize_pos_embed, g, grid)) == []


def test_old_bilinear_left_vectors_without_gradient():
  # What the gradient test catches: 14 -> 6 skipped rows and columns 2, 4, 9, 11 (96 of 196).
  missed = _unreached(_old_bilinear, 14, 6)
  skipped = {2, 4, 9, 11}
  assert len(missed) == 96
  assert set(missed) == {r * 14 + c for r in range(14) for c in range(14)
                         if r in skipped or c in skipped}
  assert len(_unreached(_old_bilinear, 14, 3)) == 160   # 96 px local crops at patch 32
  assert len(_unreached(_old_bilinear, 8, 2)) == 48     # Fashion-MNIST 16 px crops at patch 8


@pytest.mark.slow
def test_dino_local_crop_reaches_every_position_vector_through_the_model():
  vit = VisionTransformer(width=8, depth=1, num_heads=2, patch_size=16, image_size=224)
  params = vit.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  crop = jax.random.normal(jax.random.key(1), (2, 96, 96, 3))
  r = jax.random.normal(jax.random.key(2), (2, 36, 8))
  grad = jax.grad(lambda p: jnp.sum(vit.apply(p, crop, method=vit.embed) * r))(params)
  per_vector = np.abs(np.asarray(grad["params"]["pos_embed"][0])).sum(-1)
  assert per_vector.shape == (196,) and np.all(per_vector > 0)


# ------------------------------------------------------------------- unchanged where it should be
@pytest.mark.parametrize("g,grid", [(2, 7), (4, 8), (6, 14), (7, 14), (8, 13), (8, 16), (3, 4)])
def test_upsampling_is_plain_bilinear_as_before(g, grid):
  pos = jax.random.normal(jax.random.key(g * 100 + grid), (1, g * g, 16))
  np.testing.assert_array_equal(compression.resize_pos_embed(pos, grid), _old_bilinear(pos, grid))


@pytest.mark.parametrize("g", [2, 4, 8, 14, 16])
def test_factor_two_downsampling_is_the_old_value_and_the_2x2_mean(g):
  pos = jax.random.normal(jax.random.key(g), (1, g * g, 16))
  new = np.asarray(compression.resize_pos_embed(pos, g // 2))
  np.testing.assert_allclose(new, _old_bilinear(pos, g // 2), rtol=0, atol=1e-6)
  h = g // 2
  mean = np.asarray(pos, np.float64).reshape(h, 2, h, 2, 16).mean(axis=(1, 3)).reshape(1, h * h, 16)
  np.testing.assert_allclose(new, mean, rtol=0, atol=1e-6)


def test_antialiased_bilinear_would_change_factor_two():
  # Why area averaging and not jax.image.resize(antialias=True): at factor 2 the latter weights
  # the inputs (1, 3, 3, 1) / 8, not the 2x2 mean.
  x = jnp.eye(8)[:, :, None]
  m = np.asarray(jax.image.resize(x, (8, 4, 1), "linear", antialias=True))[:, :, 0].T
  np.testing.assert_allclose(m[1], [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(compression.area_resize_matrix(8, 4)[1], [0, 0, .5, .5, 0, 0, 0, 0])


def test_identity_at_the_same_grid():
  pos = jax.random.normal(jax.random.key(0), (1, 49, 4))
  assert compression.resize_pos_embed(pos, 7) is pos


# ------------------------------------------------------------------------- the area matrix itself
def test_area_matrix_rows_average_and_every_source_has_equal_total_weight():
  for dst, src in itertools.combinations_with_replacement(range(1, 25), 2):
    a = compression.area_resize_matrix(src, dst)
    assert a.shape == (dst, src) and a.min() >= 0
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    # The output cells tile the input: each source cell's weights add up to dst / src, never 0.
    np.testing.assert_allclose(a.sum(axis=0), dst / src, atol=1e-12)


def test_area_matrix_14_to_6():
  a = compression.area_resize_matrix(14, 6)
  # Output cell 0 covers input [0, 7/3): cells 0, 1 whole and a third of cell 2.
  np.testing.assert_allclose(a[0], np.r_[[3, 3, 1], np.zeros(11)] / 7, atol=1e-12)
  assert not a.flags.writeable


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("grid", [6, 7, 20])
def test_dtype_and_shape(dtype, grid):
  pos = jax.random.normal(jax.random.key(0), (1, 196, 12)).astype(dtype)
  out = compression.resize_pos_embed(pos, grid)
  assert out.shape == (1, grid * grid, 12) and out.dtype == dtype


def test_area_downsampling_is_the_area_mean_in_float64():
  pos = np.random.default_rng(0).normal(size=(1, 196, 5))
  with jax.enable_x64(True):
    out = np.asarray(compression.resize_pos_embed(jnp.asarray(pos), 6))
  a = compression.area_resize_matrix(14, 6)
  want = np.einsum("ij,kl,jld->ikd", a, a, pos.reshape(14, 14, 5)).reshape(1, 36, 5)
  np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def test_non_square_grid_is_an_error():
  with pytest.raises(ValueError, match="square"):
    compression.resize_pos_embed(jnp.zeros((1, 50, 4)), 5)
