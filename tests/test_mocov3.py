"""MoCo-v3 maths against NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_accel.objectives import mocov3


def numpy_infonce(q, k, t):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = q @ k.T / t
  logits = logits - logits.max(axis=1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return 2 * t * -np.mean(np.diag(log_prob))


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_infonce_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(12, 8)), rng.normal(size=(12, 8))
  got = mocov3.infonce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), temperature)
  np.testing.assert_allclose(float(got), numpy_infonce(q, k, temperature), rtol=1e-5)


def test_infonce_is_low_for_matching_pairs_and_high_for_shuffled():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(32, 16)).astype(np.float32)
  matched = float(mocov3.infonce(q, q, 0.2))
  shuffled = float(mocov3.infonce(q, q[::-1], 0.2))
  assert matched < 0.5 < 2.0 < shuffled


def test_momentum_schedule_cosine_from_base_to_one():
  base = 0.99
  for p in [0.0, 0.25, 0.5, 1.0]:
    expected = 1 - (1 - base) * (np.cos(np.pi * p) + 1) / 2
    np.testing.assert_allclose(float(mocov3.momentum_at(p, base)), expected, rtol=1e-6)
  assert float(mocov3.momentum_at(0.0, base)) == pytest.approx(base)
  assert float(mocov3.momentum_at(1.0, base)) == pytest.approx(1.0)


def test_ema_update_matches_numpy_and_skips_predictor():
  rng = np.random.default_rng(2)
  params = {name: {"w": rng.normal(size=(3, 4)).astype(np.float32)}
            for name in ("backbone", "projector", "predictor")}
  key = {name: {"w": rng.normal(size=(3, 4)).astype(np.float32)}
         for name in ("backbone", "projector")}
  m = 0.9
  new = mocov3.ema_update(key, params, m)
  assert set(new) == {"backbone", "projector"}
  for name in new:
    np.testing.assert_allclose(new[name]["w"], m * key[name]["w"] + (1 - m) * params[name]["w"],
                               rtol=1e-6)


@pytest.mark.slow
def test_loss_gradient_reaches_query_not_key():
  from vit_accel.models.vit import VisionTransformer
  model = mocov3.MoCoV3Model(VisionTransformer(width=16, depth=1, num_heads=2, patch_size=4,
                                               image_size=8), 32, 8, 32)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  params = model.init(jax.random.key(1), x)["params"]
  key = mocov3.key_params_of(params)
  g_query = jax.grad(lambda p: mocov3.loss_fn(model, p, key, (x, x[::-1]), 0.2))(params)
  g_key = jax.grad(lambda k: mocov3.loss_fn(model, params, k, (x, x[::-1]), 0.2))(key)
  assert float(jax.tree.reduce(lambda a, b: a + jnp.abs(b).sum(), g_query, 0.0)) > 0
  assert float(jax.tree.reduce(lambda a, b: a + jnp.abs(b).sum(), g_key, 0.0)) == 0
