"""Compression strategies: PI-resize, position-embedding resize, token keep, bucketing, cost model."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_accel import compression
from vit_accel.compression import BranchStrategies, Strategy
from vit_accel.errors import UserError
from vit_accel.models.vit import VisionTransformer


# ------------------------------------------------------------------------------------ PI-resize
@pytest.mark.parametrize("base,new", [(4, 6), (4, 8), (4, 12), (8, 13), (8, 16)])
def test_pi_resize_preserves_embedding_of_upsampled_patches_float64(base, new):
  rng = np.random.default_rng(base * 100 + new)
  x = rng.normal(size=(5, base, base, 3))
  w = rng.normal(size=(base, base, 3, 7))
  with jax.enable_x64(True):
    up = np.asarray(jax.image.resize(jnp.asarray(x, jnp.float64), (5, new, new, 3), "linear"))
    w_new = np.asarray(compression.pi_resize_kernel(jnp.asarray(w, jnp.float64), new))
  assert w_new.shape == (new, new, 3, 7)
  e_base = np.einsum("bhwc,hwcd->bd", x, w)
  e_new = np.einsum("bhwc,hwcd->bd", up, w_new)
  np.testing.assert_allclose(e_new, e_base, rtol=1e-6, atol=1e-9)


def test_pi_resize_is_identity_at_base_size():
  w = jnp.arange(4 * 4 * 3 * 2, dtype=jnp.float32).reshape(4, 4, 3, 2)
  assert compression.pi_resize_kernel(w, 4) is w
  np.testing.assert_allclose(compression.pi_resize_matrix(4, 4), np.eye(16), atol=1e-12)


def test_plain_bilinear_kernel_resize_would_not_be_invariant():
  # The reason for PI-resize: resizing the kernel like an image changes the embedding a lot.
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(4, 4, 3)), rng.normal(size=(4, 4, 3, 7))
  up = np.asarray(jax.image.resize(jnp.asarray(x), (8, 8, 3), "linear"))
  naive = np.asarray(jax.image.resize(jnp.asarray(w), (8, 8, 3, 7), "linear"))
  e_base = np.einsum("hwc,hwcd->d", x, w)
  assert np.abs(np.einsum("hwc,hwcd->d", up, naive) - e_base).max() > 0.5


def test_position_embedding_resize_identity_and_shape():
  pos = jax.random.normal(jax.random.key(0), (1, 64, 16))
  assert compression.resize_pos_embed(pos, 8) is pos
  small = compression.resize_pos_embed(pos, 4)
  assert small.shape == (1, 16, 16)
  # Bilinear halving with half-pixel centres averages each 2x2 block.
  blocks = np.asarray(pos).reshape(4, 2, 4, 2, 16).mean(axis=(1, 3)).reshape(1, 16, 16)
  np.testing.assert_allclose(small, blocks, atol=1e-5)


# ----------------------------------------------------------------------------------- token keep
def test_keep_indices_distinct_per_sample_and_differ_across_samples():
  idx = np.asarray(compression.keep_indices(jax.random.key(3), 32, 64, 16))
  assert idx.shape == (32, 16)
  assert all(len(set(row)) == 16 for row in idx)
  assert idx.min() >= 0 and idx.max() < 64
  assert len({tuple(sorted(row)) for row in idx}) > 30


def test_keep_indices_deterministic_for_a_given_rng():
  a = compression.keep_indices(jax.random.key(7), 4, 64, 16)
  b = compression.keep_indices(jax.random.key(7), 4, 64, 16)
  c = compression.keep_indices(jax.random.key(8), 4, 64, 16)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_keep_tokens_gathers_the_chosen_rows():
  tokens = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
  rng = jax.random.key(1)
  kept = compression.keep_tokens(tokens, rng, 4)
  idx = compression.keep_indices(rng, 2, 10, 4)
  for b in range(2):
    np.testing.assert_array_equal(kept[b], tokens[b, idx[b]])


def _vit(patch=4, image=32):
  vit = VisionTransformer(width=32, depth=2, num_heads=4, patch_size=patch, image_size=image)
  x = jax.random.normal(jax.random.key(0), (3, image, image, 3))
  return vit, vit.init(jax.random.key(1), x), x


def test_cls_is_first_and_untouched_under_token_keep():
  vit, params, x = _vit()
  seq = vit.apply(params, x, Strategy(keep_ratio=0.25), jax.random.key(2), method=vit.tokens)
  assert seq.shape == (3, 17, 32)
  cls = params["params"]["cls_token"][0, 0]
  np.testing.assert_array_equal(seq[:, 0], np.broadcast_to(cls, (3, 32)))
  full = vit.apply(params, x, method=vit.embed)
  # Every kept token is one of the sample's own full-length tokens.
  for b in range(3):
    d = np.abs(np.asarray(seq[b, 1:])[:, None] - np.asarray(full[b])[None]).sum(-1)
    assert np.all(d.min(axis=1) < 1e-6)


@pytest.mark.parametrize("spec,side", [("keep0.25", 32), ("patch8,keep0.5", 32),
                                       ("res16,keep0.5", 32), ("keep0.5", 16)])
def test_token_keep_before_the_embedding_equals_keep_tokens_after_it(spec, side):
  # The ViT gathers the kept patches before embedding them; that must be keep_tokens of the
  # full embedding (same rng -> same tokens), with the same gradients for every parameter. Side
  # 16 is a DINO local crop: its own 4x4 grid, not the model's 8x8.
  vit, params, _ = _vit()
  x = jax.random.normal(jax.random.key(0), (3, side, side, 3))
  strategy, rng = Strategy.parse(spec), jax.random.key(5)
  kept = vit.layout(strategy, side).kept
  assert kept < vit.layout(compression.FULL, side).num_patches

  def early(p):
    return vit.apply(p, x, strategy, rng, method=vit.tokens)[:, 1:]

  def late(p):
    return compression.keep_tokens(vit.apply(p, x, strategy, method=vit.embed), rng, kept)

  np.testing.assert_allclose(early(params), late(params), rtol=1e-6, atol=1e-6)
  w = jax.random.normal(jax.random.key(6), early(params).shape)
  g_early = jax.grad(lambda p: (early(p) * w).sum())(params)
  g_late = jax.grad(lambda p: (late(p) * w).sum())(params)
  for a, b in zip(jax.tree.leaves(g_early), jax.tree.leaves(g_late)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(g_early["params"]["pos_embed"]).sum()) > 0


@pytest.mark.parametrize("spec,tokens", [("full", 64), ("keep0.25", 16), ("keep0.5", 32),
                                         ("patch8", 16), ("patch8,keep0.5", 8), ("res16", 16),
                                         ("patch12", 9), ("count24", 24), ("patch16", 4)])
def test_compressed_forward_has_expected_length_and_finite_outputs(spec, tokens):
  vit, params, x = _vit()
  strategy = Strategy.parse(spec)
  assert vit.layout(strategy).kept == tokens
  cls, out = vit.apply(params, x, strategy, jax.random.key(4))
  assert out.shape == (3, tokens, 32)
  assert cls.shape == (3, 32)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_token_keep_needs_an_rng():
  vit, params, x = _vit()
  with pytest.raises(ValueError, match="needs an rng"):
    vit.apply(params, x, Strategy(keep_ratio=0.5))


@pytest.mark.parametrize("spec", ["patch8", "patch12", "res16"])
def test_gradients_reach_the_base_kernel_and_pos_embed(spec):
  vit, params, x = _vit()
  grads = jax.grad(lambda p: vit.apply(p, x, Strategy.parse(spec))[0].sum())(params)
  g = grads["params"]
  assert g["patch_embed"]["kernel"].shape == (4, 4, 3, 32)
  assert float(jnp.abs(g["patch_embed"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["pos_embed"]).sum()) > 0


def test_full_strategy_equals_plain_call():
  vit, params, x = _vit()
  a = vit.apply(params, x)[0]
  b = vit.apply(params, x, Strategy.parse("keep1.0"), jax.random.key(0))[0]
  np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- bucketing, errors
@pytest.mark.parametrize("wanted,n,bucket,expected", [
    (16, 64, 8, 16), (19.2, 64, 8, 16), (20, 64, 8, 24), (0.6, 64, 8, 8), (64, 64, 8, 64),
    (49, 49, 8, 49), (45.5, 49, 8, 48), (2, 4, 8, 4), (5, 16, 4, 4), (6, 16, 4, 8)])
def test_round_to_bucket(wanted, n, bucket, expected):
  assert compression.round_to_bucket(wanted, n, bucket) == expected


def test_layout_arithmetic():
  lay = Strategy(patch_size=12).layout(32, 4)
  assert (lay.grid, lay.input_size, lay.num_patches, lay.seq_len) == (3, 36, 9, 10)
  lay = Strategy(resolution=16).layout(32, 4)
  assert (lay.patch_size, lay.grid, lay.input_size) == (4, 4, 16)
  # The paper's 25% of 196 = 49 patches rounds to the bucket (48); bucket 1 keeps it exact.
  assert Strategy(keep_ratio=0.25).layout(224, 16).seq_len == 48 + 1
  assert Strategy(keep_ratio=0.25, bucket=1).layout(224, 16).seq_len == 49 + 1


@pytest.mark.parametrize("make,match", [
    (lambda: Strategy(patch_size=40).layout(32, 4), "larger than"),
    (lambda: Strategy(keep_ratio=0.0), "outside"),
    (lambda: Strategy(keep_ratio=1.5), "outside"),
    (lambda: Strategy(bucket=0), "bucket"),
    (lambda: Strategy(patch_size=8, resolution=16), "not both"),
    (lambda: Strategy(keep_count=100).layout(32, 4), "only 64"),
    (lambda: Strategy(resolution=2).layout(32, 4), "smaller than one base patch"),
    (lambda: Strategy.parse("drop0.5"), "cannot read"),
    (lambda: Strategy.parse("keepx"), "cannot read"),
    (lambda: BranchStrategies.parse("full|full|full|full"), re.escape("'QUERY|KEY|LOCAL'")),
    (lambda: BranchStrategies.parse("full|full|full,crops-1"), "one 'crops<N>' with N >= 0"),
    (lambda: BranchStrategies.parse("full|full|crops2,crops3"), "one 'crops<N>'"),
    (lambda: BranchStrategies.parse("full|full|cropsx"), "one 'crops<N>'"),
])
def test_invalid_strategies_raise_a_clear_error(make, match):
  with pytest.raises(UserError, match=match):
    make()


def test_spec_round_trip():
  for spec in ["full", "keep0.25", "patch8", "patch8,keep0.5", "res16", "count16"]:
    assert Strategy.parse(spec).spec == spec
  pair = BranchStrategies.parse("keep0.25|patch8")
  assert (pair.query.spec, pair.key.spec, pair.spec) == ("keep0.25", "patch8", "keep0.25|patch8")
  assert BranchStrategies.parse("keep0.25").key == compression.FULL


# ----------------------------------------------------------------------------------- cost model
def _model_cfg(**kw):
  return ml_collections.ConfigDict(dict(width=128, depth=4, mlp_ratio=4.0, patch_size=4,
                                        image_size=32, **kw))


def test_one_uncompressed_forward_is_one_unit():
  m = _model_cfg()
  full = compression.FULL.layout(32, 4)
  assert compression.branches_cost_units(m, [compression.Branch(full, 0.0, False)]) == pytest.approx(1)
  assert compression.branches_cost_units(m, [compression.Branch(full, 0.0, True)]) == pytest.approx(3)


def test_backbone_flops_by_hand():
  m = _model_cfg()
  lay = Strategy(keep_ratio=0.25).layout(32, 4)   # 16 kept patches + CLS
  w, n = 128, 17
  embed = 2 * 64 * 4 * 4 * 3 * w                  # charged for every patch, kept or not
  block = 2 * n * (4 * w * w + 2 * w * 512) + 4 * n * n * w
  assert compression.backbone_forward_flops(m, lay) == pytest.approx(embed + 4 * block)


def test_compressed_costs_less_and_attention_is_quadratic():
  m = _model_cfg()
  units = {s: compression.branches_cost_units(
      m, [compression.Branch(Strategy.parse(s).layout(32, 4), 0.0, False)])
      for s in ["full", "keep0.5", "keep0.25", "patch8"]}
  assert units["full"] > units["keep0.5"] > units["keep0.25"]
  assert units["keep0.25"] < 0.3 and units["patch8"] < 0.3
  # Attention's n^2 term: halving the tokens saves a bit more than half of the block cost.
  assert units["keep0.5"] < 0.52


def test_local_crop_count_round_trips_and_is_its_own_program():
  st = BranchStrategies.parse("patch8|patch8|full,crops2")
  assert (st.local.spec, st.local_crops, st.spec) == ("full", 2, "patch8|patch8|full,crops2")
  assert BranchStrategies.parse(st.spec) == st
  assert BranchStrategies.parse("patch8|full|crops0").spec == "patch8|full|full,crops0"
  assert BranchStrategies.parse("patch8|patch8|full").local_crops is None
  # Fewer crops is another program: canonical() keeps the explicit local part.
  assert BranchStrategies.parse("patch8|full|patch8,crops2").canonical().local_crops == 2
  assert BranchStrategies.parse("patch8|full|patch8").canonical().local is None
  # The uncompressed step, however it is spelled; fewer crops is compression.
  assert BranchStrategies.parse("full").is_full and BranchStrategies.parse("full|full|full").is_full
  assert not BranchStrategies.parse("full|full|full,crops2").is_full
  assert not BranchStrategies.parse("full|keep0.5").is_full
