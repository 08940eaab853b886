"""kNN evaluation against a brute-force NumPy reference."""
import numpy as np

from vit_accel import evaluation


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


def test_linear_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(1)
  x, _ = separable_features(rng, 2000)
  xt, _ = separable_features(rng, 1000)
  out = evaluation.linear_probe(x, rng.integers(0, 6, 2000), xt, rng.integers(0, 6, 1000))
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
