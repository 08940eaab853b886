"""ViT and head shapes and behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_accel.compression import Strategy
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


# ------------------------------------------------------------------------------------ attention
def _strategy_specs():
  """Every single-branch strategy the fmnist recipes ship (presets' and candidates' specs), plus
  one of each kind they do not use."""
  from configs import fmnist_dino, fmnist_mocov3, fmnist_simclr
  from vit_accel.compression import BranchStrategies
  specs = {"full", "count16", "res16", "res24", "patch8,keep0.5", "patch16"}
  for recipe in (fmnist_mocov3, fmnist_simclr, fmnist_dino):
    c = recipe.get_config()
    for spec in (*c.compression.cost_candidates, *c.grad_error.candidates, *c.online.candidates):
      b = BranchStrategies.parse(spec)
      specs |= {b.query.spec, b.key.spec, b.local_strategy.spec}
  return sorted(specs)


def _features(monkeypatch, spec, dtype, reference=False, pad_to=0, attention="xla"):
  from vit_accel.compression import Strategy
  from vit_accel.models import vit as vit_module
  if reference:   # flax's own attention: what the backbone used before jax.nn.dot_product_attention
    import flax.linen as nn
    monkeypatch.setattr(vit_module, "dot_product_attention",
                        lambda q, k, v, **_: nn.dot_product_attention(q, k, v, dtype=q.dtype))
  model = VisionTransformer(width=32, depth=2, num_heads=4, patch_size=4, image_size=32,
                            dtype=dtype, attention=attention, attention_pad_to=pad_to)
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  params = model.init(jax.random.key(1), images)
  strategy = Strategy.parse(spec)
  out = jax.jit(lambda p, x, r: model.apply(p, x, strategy, r))(params, images, jax.random.key(2))
  monkeypatch.undo()
  return [np.asarray(o, np.float32) for o in out]


@pytest.mark.parametrize("spec", _strategy_specs())
def test_dot_product_attention_matches_flax_attention_for_every_strategy(monkeypatch, spec):
  ref = _features(monkeypatch, spec, jnp.float32, reference=True)
  flax_bf16 = _features(monkeypatch, spec, jnp.bfloat16, reference=True)
  for attention in ("xla", "heads_major"):   # the references are computed once for both
    ours = _features(monkeypatch, spec, jnp.float32, attention=attention)
    for r, o in zip(ref, ours):
      np.testing.assert_allclose(o, r, atol=2e-5, rtol=2e-5, err_msg=attention)
    # bfloat16: both within bf16 rounding of the float32 result; ours (float32 softmax) no worse.
    ours_bf16 = _features(monkeypatch, spec, jnp.bfloat16, attention=attention)
    for r, f, o in zip(ref, flax_bf16, ours_bf16):
      err_ours, err_flax = np.max(np.abs(o - r)), np.max(np.abs(f - r))
      assert err_ours < 0.1 * np.max(np.abs(r)), (spec, attention, err_ours)
      assert err_ours <= 1.5 * err_flax + 1e-3, (spec, attention, err_ours, err_flax)


@pytest.mark.parametrize("attention", ["xla", "heads_major"])
@pytest.mark.parametrize("pad_to", [8, 64])
@pytest.mark.parametrize("spec", ["full", "keep0.25", "patch8"])
def test_padded_attention_gives_the_same_features(monkeypatch, spec, pad_to, attention):
  plain = _features(monkeypatch, spec, jnp.float32, attention=attention)
  padded = _features(monkeypatch, spec, jnp.float32, pad_to=pad_to, attention=attention)
  for p, q in zip(plain, padded):
    np.testing.assert_allclose(q, p, atol=1e-5, rtol=1e-5)


def test_attention_choice():
  from vit_accel.models.vit import attention_implementation
  assert attention_implementation("auto", jnp.bfloat16, 64, platform="gpu") == "cudnn"
  assert attention_implementation("auto", jnp.float32, 64, platform="gpu") == "xla"
  assert attention_implementation("auto", jnp.bfloat16, 12, platform="gpu") == "xla"  # not x8
  assert attention_implementation("auto", jnp.bfloat16, 64, platform="cpu") == "heads_major"
  assert attention_implementation("auto", jnp.float32, 64, platform="tpu") == "xla"
  assert attention_implementation("heads_major", jnp.bfloat16, 64, platform="gpu") == "heads_major"
  assert attention_implementation("xla", jnp.bfloat16, 64, platform="gpu") == "xla"
  with pytest.raises(ValueError, match="model.attention"):
    attention_implementation("flash", jnp.bfloat16, 64)



def _remat_loss(remat, images):
  model = VisionTransformer(width=64, depth=3, num_heads=4, patch_size=8, image_size=32,
                            remat=remat)
  strategy = Strategy.parse("keep0.5")

  def loss(p):
    cls, tokens = model.apply(p, images, strategy, jax.random.key(2))
    return jnp.mean(jnp.square(cls)) + jnp.mean(jnp.square(tokens))
  return model, loss


def _residual_bytes(loss, params):
  """Bytes the backward pass keeps from the forward pass: jax.vjp's backward function is a pytree
  whose leaves are those residuals (parameters included, the same for every policy)."""
  _, backward = jax.vjp(loss, params)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(backward))


def test_remat_keeps_parameters_and_gradients_and_stores_fewer_activations():
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  model, loss = _remat_loss("none", images)
  params = model.init(jax.random.key(1), images[:2])
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  stored = _residual_bytes(loss, params)
  kept = {}
  for policy in ("block", "dots"):
    model2, loss2 = _remat_loss(policy, images)
    # The same parameter tree (checkpoints and exports read it) and the same gradients.
    assert jax.tree.structure(model2.init(jax.random.key(1), images[:2])) == \
        jax.tree.structure(params)
    v2, g2 = jax.jit(jax.value_and_grad(loss2))(params)
    np.testing.assert_allclose(v2, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    kept[policy] = _residual_bytes(loss2, params)
  # 'block' keeps only block inputs; 'dots' also the dense outputs, still less than everything.
  assert kept["block"] < kept["dots"] < stored, (kept, stored)
  assert kept["block"] < 0.5 * stored, (kept, stored)
  with pytest.raises(ValueError, match="model.remat"):
    _remat_loss("all", images)[1](params)


def test_gelu_is_the_exact_erf_gelu():
  from vit_accel.models.vit import gelu
  x = jnp.linspace(-12.0, 12.0, 100001, dtype=jnp.float32)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6, rtol=1e-6)
  # The gradient too (what training uses), and a bfloat16 input stays bfloat16.
  grad = jax.vmap(jax.grad(gelu))(x)
  reference = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(grad, reference, atol=2e-6, rtol=1e-5)
  half = gelu(x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), jax.nn.gelu(x, approximate=False),
                             atol=0.06, rtol=0.02)
  # Not the tanh approximation: that differs by up to ~5e-4.
  assert float(jnp.max(jnp.abs(gelu(x) - jax.nn.gelu(x, approximate=True)))) > 1e-4


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", [
    ((3, 5, 8), (8, 6), (((2,), (0,)), ((), ()))),              # nn.Dense on tokens
    ((3, 5, 8), (8, 2, 4), (((2,), (0,)), ((), ()))),           # attention's q/k/v projection
    ((3, 5, 2, 4), (2, 4, 8), (((2, 3), (0, 1)), ((), ()))),    # attention's output projection
    ((3, 5, 8), (3, 8, 6), (((2,), (1,)), ((0,), (0,)))),       # batched: passed through
    ((8, 5), (8, 6), (((0,), (0,)), ((), ()))),                 # leading contraction: passed through
])
def test_flat_dot_general_is_dot_general_with_the_same_gradients(lhs_shape, rhs_shape, dims):
  from vit_accel.models.vit import flat_dot_general
  k1, k2 = jax.random.split(jax.random.key(0))
  lhs, rhs = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)
  ours = lambda a, b: jnp.sum(jnp.sin(flat_dot_general(a, b, dims)))           # noqa: E731
  ref = lambda a, b: jnp.sum(jnp.sin(jax.lax.dot_general(a, b, dims)))         # noqa: E731
  np.testing.assert_allclose(flat_dot_general(lhs, rhs, dims), jax.lax.dot_general(lhs, rhs, dims),
                             rtol=1e-5, atol=1e-5)
  for g, r in zip(jax.grad(ours, (0, 1))(lhs, rhs), jax.grad(ref, (0, 1))(lhs, rhs)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  out = flat_dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dims,
                         preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32


def test_vit_gradients_contract_one_dimension_per_matmul():
  # Why flat_dot_general exists: a kernel gradient that contracts batch and tokens together is laid
  # out by XLA's CPU backend with a slow transposing copy. Every matmul of the ViT's forward and
  # backward (batch-free ones: the dense layers and the patch embedding) contracts one dimension.
  model = VisionTransformer(width=32, depth=1, num_heads=2, patch_size=8, image_size=32)
  images = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), images)
  loss = lambda p: jnp.sum(model.apply(p, images)[0] ** 2)   # noqa: E731
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)

  def dots(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn.params["dimension_numbers"]
      for v in eqn.params.values():   # nested jaxprs (pjit, custom_vjp, remat)
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from dots(sub)

  unbatched = [d for d in dots(jaxpr.jaxpr) if not d[1][0]]
  assert len(unbatched) >= 8, unbatched   # forward, input and kernel gradients of 4+ matmuls
  assert all(len(d[0][0]) == 1 for d in unbatched), unbatched


def test_self_attention_is_flax_multi_head_attention_with_the_same_parameters():
  # Same parameter tree and initial values (checkpoints and the timm export read them), same output.
  import flax.linen as nn

  from vit_accel.models.vit import SelfAttention
  b, t, width = 3, 7, 32
  x = jax.random.normal(jax.random.key(0), (b, t, width))
  ours = SelfAttention(num_heads=4)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4,
                                             kernel_init=nn.initializers.xavier_uniform())
  p_ours = ours.init(jax.random.key(1), x.reshape(b * t, width), (b, t))
  p_flax = flax_mha.init(jax.random.key(1), x, x)
  assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_flax)
  for u, v in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_flax)):
    np.testing.assert_array_equal(u, v)
  y = ours.apply(p_flax, x.reshape(b * t, width), (b, t)).reshape(b, t, width)
  np.testing.assert_allclose(y, flax_mha.apply(p_flax, x, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad_to", [0, 8])
def test_heads_major_attention_has_the_xla_paths_values_and_gradients(pad_to):
  """The CPU default ('heads_major') computes jax.nn.dot_product_attention's function: outputs and
  the gradients of q, k and v, float32 (padded keys masked out when pad_to > 1)."""
  from vit_accel.models.vit import dot_product_attention
  q, k, v = (jax.random.normal(jax.random.key(i), (3, 13, 4, 8)) for i in range(3))
  weights = jax.random.normal(jax.random.key(3), (3, 13, 4, 8))

  def loss(implementation, pad):
    return lambda a, b, c: jnp.sum(weights * dot_product_attention(
      a, b, c, implementation=implementation, pad_to=pad))
  ref_value, ref_grads = jax.value_and_grad(loss("xla", 0), argnums=(0, 1, 2))(q, k, v)
  value, grads = jax.jit(jax.value_and_grad(loss("heads_major", pad_to), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(ref_grads[1]))) > 1e-3   # gradients are not trivially zero
