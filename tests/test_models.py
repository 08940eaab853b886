"""ViT and head shapes and behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_accel.models.heads import BatchStatNorm, MLPHead
from vit_accel.models.vit import VisionTransformer


@pytest.mark.parametrize("patch,image", [(4, 32), (8, 32), (16, 48)])
def test_vit_output_shapes(patch, image):
  vit = VisionTransformer(width=32, depth=2, num_heads=4, patch_size=patch, image_size=image)
  x = jnp.zeros((3, image, image, 3))
  params = vit.init(jax.random.key(0), x)
  cls, tokens = vit.apply(params, x)
  n = (image // patch) ** 2
  assert cls.shape == (3, 32)
  assert tokens.shape == (3, n, 32)
  assert params["params"]["pos_embed"].shape == (1, n, 32)


def test_vit_rejects_patch_that_does_not_tile():
  vit = VisionTransformer(width=32, depth=1, num_heads=4, patch_size=5, image_size=32)
  with pytest.raises(ValueError, match="does not tile"):
    vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_vit_cls_depends_on_every_patch():
  vit = VisionTransformer(width=16, depth=1, num_heads=2, patch_size=4, image_size=8)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  params = vit.init(jax.random.key(1), x)
  grad = jax.grad(lambda im: vit.apply(params, im)[0].sum())(x)
  per_patch = jnp.abs(grad).reshape(2, 4, 2, 4, 3).sum(axis=(1, 3, 4))
  assert bool(jnp.all(per_patch > 0))


def test_batch_stat_norm_standardises_over_batch():
  x = jax.random.normal(jax.random.key(0), (64, 5)) * 3 + 7
  norm = BatchStatNorm(use_scale=False, use_bias=False)
  y = norm.apply({}, x)
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(0), 1, atol=1e-3)


def test_mlp_head_shape_and_param_tree_has_no_batch_stats():
  head = MLPHead(hidden_dim=32, out_dim=8, num_layers=3)
  variables = head.init(jax.random.key(0), jnp.ones((4, 16)))
  assert set(variables) == {"params"}
  assert head.apply(variables, jnp.ones((4, 16)) * jnp.arange(4)[:, None]).shape == (4, 8)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_outputs():
  vit32 = VisionTransformer(width=32, depth=2, num_heads=4, patch_size=4, image_size=16)
  vit16 = vit32.clone(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = vit32.init(jax.random.key(1), x)
  assert {p.dtype for p in jax.tree.leaves(vit16.init(jax.random.key(1), x))} == {np.dtype("float32")}
  cls32, _ = vit32.apply(params, x)
  cls16, _ = vit16.apply(params, x)
  assert cls16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(cls16, np.float32), np.asarray(cls32), atol=0.1)
  assert not np.array_equal(np.asarray(cls16, np.float32), np.asarray(cls32))
