"""kNN evaluation against a brute-force NumPy reference; the ridge and logistic linear probes."""
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from vit_accel import config_domains, evaluation, evaluator
from vit_accel.errors import UserError


def numpy_knn(bank, bank_labels, query, k, t, num_classes):
  sims = query @ bank.T
  preds = []
  for row in sims:
    idx = np.argsort(-row)[:k]
    votes = np.zeros(num_classes)
    np.add.at(votes, bank_labels[idx], np.exp(row[idx] / t))
    preds.append(np.argmax(votes))
  return np.array(preds)


def normed(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_knn_matches_numpy_reference():
  rng = np.random.default_rng(0)
  bank = normed(rng.normal(size=(300, 8)))
  labels = rng.integers(0, 5, 300)
  query = normed(rng.normal(size=(70, 8)))
  got = evaluation.knn_predict(bank, labels, query, k=7, temperature=0.07, num_classes=5, chunk=32)
  np.testing.assert_array_equal(got, numpy_knn(bank, labels, query, 7, 0.07, 5))


def test_knn_separates_clusters_and_fails_on_noise():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 16)) * 5
  labels = rng.integers(0, 4, 400)
  feats = normed(centers[labels] + rng.normal(size=(400, 16)))
  acc = evaluation.knn_top1(feats[:300], labels[:300], feats[300:], labels[300:], k=10)
  assert acc > 0.95
  noise = normed(rng.normal(size=(400, 16)))
  assert evaluation.knn_top1(noise[:300], labels[:300], noise[300:], labels[300:], k=10) < 0.5


def separable_features(rng, n, dim=32, classes=6, margin=3.0):
  """Class c lives around margin * e_c plus isotropic noise: linearly separable with high accuracy,
  but not by nearest neighbours on raw norms (a nuisance dimension has large variance)."""
  labels = rng.integers(0, classes, n)
  x = rng.normal(size=(n, dim))
  x[np.arange(n), labels] += margin
  x[:, -1] *= 50.0  # large-variance nuisance feature; standardisation must handle it
  return x.astype(np.float32), labels


def test_linear_probe_separates_linearly_separable_features():
  rng = np.random.default_rng(0)
  x, y = separable_features(rng, 3000)
  xt, yt = separable_features(rng, 1000)
  out = evaluation.linear_probe(x, y, xt, yt)
  assert out["top1"] > 0.9, out
  assert out["l2"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@pytest.mark.parametrize("probe", ["linear_probe", "logistic_probe"])
def test_probes_are_at_chance_on_random_labels(probe):
  rng = np.random.default_rng(1)
  x, _ = separable_features(rng, 2000)
  xt, _ = separable_features(rng, 1000)
  out = getattr(evaluation, probe)(x, rng.integers(0, 6, 2000), xt, rng.integers(0, 6, 1000))
  assert out["top1"] < 0.25, out


def test_linear_probe_recovers_ridge_solution():
  """With one l2 value and no held-out split needed, predictions equal an explicit ridge fit."""
  rng = np.random.default_rng(2)
  x, y = separable_features(rng, 400, dim=8, classes=3, margin=1.0)
  xt, yt = separable_features(rng, 200, dim=8, classes=3, margin=1.0)
  out = evaluation.linear_probe(x, y, xt, yt, l2_grid=(0.1,))
  mean, std = x.mean(0), x.std(0) + 1e-6
  a = np.c_[(x - mean) / std, np.ones(len(x))]
  pen = 0.1 * len(x) * np.diag([1.0] * 8 + [0.0])
  w = np.linalg.solve(a.T @ a + pen, a.T @ np.eye(3)[y])
  expected = np.mean(np.argmax(np.c_[(xt - mean) / std, np.ones(len(xt))] @ w, 1) == yt)
  assert abs(out["top1"] - expected) < 1e-9


# Logistic probe (evaluation.logistic_probe): the same protocol, fitted by L-BFGS.

def margin_separable_features(rng, n, dim=16, classes=4, margin=0.5):
  """Labels are the argmax of a fixed random linear map (seeded apart from the samples), keeping
  only points whose top score beats the runner-up by `margin`: linearly separable by construction."""
  proj = np.random.default_rng(123).normal(size=(dim, classes))
  x = np.zeros((0, dim))
  while len(x) < n:
    cand = rng.normal(size=(4 * n, dim))
    scores = np.sort(cand @ proj, axis=1)
    x = np.concatenate([x, cand[scores[:, -1] - scores[:, -2] > margin]])
  x = x[:n]
  return x.astype(np.float32), np.argmax(x @ proj, axis=1)


def test_logistic_probe_reaches_one_on_linearly_separable_features():
  rng = np.random.default_rng(3)
  x, y = margin_separable_features(rng, 2000)
  xt, yt = margin_separable_features(rng, 1000)
  out = evaluation.logistic_probe(x, y, xt, yt)
  assert out["top1"] >= 0.98, out
  assert out["l2"] in (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
  assert out["val_top1"] >= 0.97, out
  # Least squares onto one-hot targets does not find the separating plane here (0.94): the probe
  # really minimises the logistic loss.
  assert out["top1"] > evaluation.linear_probe(x, y, xt, yt)["top1"] + 0.03


def test_logistic_probe_on_noisy_gaussians_beats_chance_and_agrees_with_ridge():
  rng = np.random.default_rng(0)
  x, y = separable_features(rng, 3000)   # 6 classes: chance 1/6
  xt, yt = separable_features(rng, 1000)
  logistic = evaluation.logistic_probe(x, y, xt, yt)
  ridge = evaluation.linear_probe(x, y, xt, yt)
  assert logistic["top1"] > 0.9, logistic
  assert abs(logistic["top1"] - ridge["top1"]) < 0.03, (logistic, ridge)


def test_logistic_probe_is_deterministic_and_its_choice_is_from_the_grid():
  rng = np.random.default_rng(4)
  x, y = separable_features(rng, 1500, margin=1.0)
  xt, yt = separable_features(rng, 500, margin=1.0)
  grid = (0.0, 1e-3, 1e-1)
  first = evaluation.logistic_probe(x, y, xt, yt, weight_decay_grid=grid, seed=7)
  assert first == evaluation.logistic_probe(x, y, xt, yt, weight_decay_grid=grid, seed=7)
  assert first["l2"] in grid and 1 <= first["iterations"] <= 100


def test_holdout_split_is_disjoint_complete_and_seeded():
  val, fit = evaluation.holdout_split(1000, 0.2, seed=0)
  assert len(val) == 200 and len(fit) == 800
  assert not set(val) & set(fit)
  np.testing.assert_array_equal(np.sort(np.concatenate([val, fit])), np.arange(1000))
  np.testing.assert_array_equal(val, evaluation.holdout_split(1000, 0.2, seed=0)[0])
  assert set(val) != set(evaluation.holdout_split(1000, 0.2, seed=1)[0])
  with pytest.raises(ValueError, match="val_fraction"):
    evaluation.holdout_split(10, 1.0, seed=0)


def fit_logistic(x, y, weight, wd, classes):
  params, _ = evaluation._fit_logistic(jnp.asarray(x), jnp.asarray(y), jnp.asarray(weight),
                                       jnp.float32(wd), num_classes=classes, max_iter=300,
                                       tol=jnp.float32(1e-6))
  return np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)


def test_logistic_fit_is_the_stationary_point_of_its_objective():
  """NumPy gradient of mean softmax cross-entropy + wd / 2 ||W||^2 (bias unpenalised) at the fit."""
  rng = np.random.default_rng(5)
  x, y = separable_features(rng, 600, dim=8, classes=3, margin=1.0)
  x = (x - x.mean(0)) / x.std(0)
  wd = 1e-2
  w, b = fit_logistic(x, y, np.ones(len(x), np.float32), wd, 3)
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  residual = (p - np.eye(3)[y]) / len(x)
  grad_w, grad_b = x.T @ residual + wd * w, residual.sum(0)
  assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
  assert np.abs(w).max() > 0.1   # a real fit, not the zero start


def test_held_out_samples_do_not_enter_the_fit():
  """Zero-weight rows (the held-out part) leave the fit as if they were absent, even when their
  labels are scrambled."""
  rng = np.random.default_rng(6)
  x, y = separable_features(rng, 500, dim=8, classes=3, margin=1.0)
  x = (x - x.mean(0)) / x.std(0)
  held = np.zeros(len(x), np.float32)
  held[:100] = 1.0
  scrambled = y.copy()
  scrambled[:100] = rng.integers(0, 3, 100)
  w_mask, b_mask = fit_logistic(x, scrambled, 1.0 - held, 1e-2, 3)
  w_sub, b_sub = fit_logistic(x[100:], y[100:], np.ones(400, np.float32), 1e-2, 3)
  np.testing.assert_allclose(w_mask, w_sub, atol=1e-3)
  np.testing.assert_allclose(b_mask, b_sub, atol=1e-3)


def test_eval_linear_dispatch_and_domain():
  config = base.get_config()
  assert config.eval.linear == "ridge"
  assert evaluator.PROBES[evaluator.linear_kind(config)] is evaluation.linear_probe
  config.eval.linear = "logistic"
  config_domains.check(config)
  assert evaluator.PROBES[evaluator.linear_kind(config)] is evaluation.logistic_probe
  config.eval.linear = "svm"
  with pytest.raises(UserError, match=r"^eval.linear='svm' is out of range: must be one of "
                                      r"'ridge', 'logistic'$"):
    config_domains.check(config)
