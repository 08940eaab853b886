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
