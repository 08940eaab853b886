"""Evaluation on frozen backbone features: weighted kNN (InstDisc / DINO protocol) and linear probes
(closed-form ridge, or multinomial logistic regression fitted with L-BFGS)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_accel import sharding as sharding_lib


def batched_apply(fn, params, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """fn(params, uint8 batch [B, S, S, 3]) -> [B, ...] over all of `images` (uint8 [N, S, S, 3]) in
  global batches of `batch_size` sharded over `mesh`; returns the host NumPy array [N, ...].

  `fn` must be jitted; the last batch is zero-padded so every batch has the same (compiled) shape and
  the padding's outputs are dropped. Every process feeds its slice of each global batch."""
  chunks = (images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))
  return np.concatenate(list(apply_to_chunks(fn, params, chunks, batch_size, mesh)))


def apply_to_chunks(fn, params, chunks, batch_size: int, mesh):
  """batched_apply over an iterable of uint8 chunks [b <= batch_size, S, S, 3] (e.g.
  pipeline.eval_batches' images): yields fn's host output [b, ...] for each, so the inputs need
  never be in memory at once. Every process must pass the same chunks; each feeds its slice."""
  pc, pi = jax.process_count(), jax.process_index()
  local = batch_size // pc
  for chunk in chunks:
    n = chunk.shape[0]
    if n < batch_size:
      pad = np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    x = sharding_lib.host_to_global(chunk[pi * local:(pi + 1) * local], mesh)
    yield sharding_lib.to_host(fn(params, x))[:n]


def extract_features(feature_fn, params, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """L2-normalised float32 features [N, D] of uint8 images [N, S, S, 3], computed in sharded batches
  (batched_apply; `feature_fn(params, uint8_batch) -> [B, D]`, jitted)."""
  feats = batched_apply(feature_fn, params, images, batch_size, mesh).astype(np.float32)
  return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_vote(query, bank, bank_labels, *, k: int, num_classes: int, temperature):
  sims = query @ bank.T                                   # cosine (features are L2-normalised)
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * weights[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_predict(bank_feats, bank_labels, query_feats, *, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> np.ndarray:
  """Weighted kNN: each of the k nearest bank features (cosine) votes for its label with weight
  exp(sim / temperature). Returns predicted labels for the queries."""
  num_classes = int(num_classes or bank_labels.max() + 1)
  k = min(k, bank_feats.shape[0])
  bank = jnp.asarray(bank_feats)
  labels = jnp.asarray(bank_labels)
  preds = []
  for start in range(0, query_feats.shape[0], chunk):
    q = query_feats[start:start + chunk]
    n = q.shape[0]
    if n < chunk:  # pad to one compiled shape
      q = np.concatenate([q, np.zeros((chunk - n, q.shape[1]), q.dtype)])
    preds.append(np.asarray(_knn_vote(jnp.asarray(q), bank, labels, k=k, num_classes=num_classes,
                                      temperature=temperature))[:n])
  return np.concatenate(preds)


def knn_top1(bank_feats, bank_labels, query_feats, query_labels, **kwargs) -> float:
  preds = knn_predict(bank_feats, bank_labels, query_feats, **kwargs)
  return float(np.mean(preds == query_labels))


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(held-out indices, fit indices) of n samples: a seeded permutation, the first
  round(val_fraction x n) held out. Disjoint int64 index arrays that together cover range(n); the
  same split for the same (n, val_fraction, seed). ValueError unless 0 <= val_fraction < 1."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
  order = np.random.default_rng(seed).permutation(n)
  n_val = int(round(val_fraction * n))
  return order[:n_val], order[n_val:]


def _standardiser(train_feats):
  """f -> (f - mean) / std with the train features' per-dimension statistics (float64)."""
  x = np.asarray(train_feats, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  return lambda f: (np.asarray(f, np.float64) - mean) / std


def _num_classes(train_labels, test_labels, num_classes):
  return int(num_classes or max(np.max(train_labels), np.max(test_labels)) + 1)


def linear_probe(train_feats, train_labels, test_feats, test_labels, *,
                 l2_grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0), val_fraction: float = 0.2,
                 seed: int = 0, num_classes: int | None = None) -> dict:
  """Linear probe on frozen features, closed-form: ridge regression onto one-hot labels (a linear
  classifier by least squares, argmax to predict), on features standardised with the train
  statistics, with a bias. The ridge strength (x number of train samples) is picked from `l2_grid`
  on a held-out `val_fraction` of the train features, then refit on all of them. Deterministic, no
  learning rate or epochs to tune, seconds on a CPU; typically a few points below a tuned logistic
  regression (logistic_probe). Returns {"top1", "l2", "val_top1"}."""
  y = np.asarray(train_labels)
  num_classes = _num_classes(y, test_labels, num_classes)
  standardise = _standardiser(train_feats)

  def design(f):
    f = standardise(f)
    return np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)

  def fit(a, labels, l2):
    targets = np.eye(num_classes)[labels]
    gram = a.T @ a + l2 * a.shape[0] * np.eye(a.shape[1])
    gram[-1, -1] -= l2 * a.shape[0]  # the bias is not penalised
    return np.linalg.solve(gram, a.T @ targets)

  a = design(train_feats)
  val, tr = holdout_split(a.shape[0], val_fraction, seed)
  n_val = len(val)
  scores = {}
  for l2 in l2_grid:
    w = fit(a[tr], y[tr], l2)
    scores[l2] = float(np.mean(np.argmax(a[val] @ w, axis=1) == y[val])) if n_val else 0.0
  best = max(l2_grid, key=lambda l2: (scores[l2], l2))  # ties -> stronger regularisation
  w = fit(a, y, best)
  top1 = float(np.mean(np.argmax(design(test_feats) @ w, axis=1) == np.asarray(test_labels)))
  return {"top1": top1, "l2": float(best), "val_top1": scores[best]}


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit_logistic(x, y, sample_weight, weight_decay, *, num_classes: int, max_iter: int, tol):
  """L-BFGS on mean (sample-weighted) softmax cross-entropy + weight_decay / 2 x ||W||^2, from
  zero. The held-out fits and the final refit differ only in `sample_weight` (0 = left out), so one
  compiled program serves them all."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
            "b": jnp.zeros((num_classes,), x.dtype)}
  total = jnp.sum(sample_weight)

  def loss(p):
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)
    return jnp.sum(sample_weight * ce) / total + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  # Reuses the value and gradient the line search already computed at the accepted point.
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  def going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return params, optax.tree.get(state, "count")


def logistic_probe(train_feats, train_labels, test_feats, test_labels, *,
                   weight_decay_grid=(0.0, 1e-5, 1e-4, 1e-3, 1e-2), val_fraction: float = 0.2,
                   seed: int = 0, num_classes: int | None = None, max_iter: int = 100,
                   tol: float = 1e-5) -> dict:
  """Linear probe trained as multinomial logistic regression on frozen, precomputed features.

  A linear classifier with bias, softmax cross-entropy (mean over samples) plus
  weight_decay / 2 x ||W||^2 (the bias is not penalised), fitted full-batch with L-BFGS and a zoom
  line search (optax.lbfgs; Nocedal & Wright, Numerical Optimization, alg. 7.4/7.5) for at most
  `max_iter` iterations or until the gradient norm is below `tol`. Features are standardised with
  the train statistics as linear_probe does. The weight decay is picked from `weight_decay_grid`
  on a held-out `val_fraction` of the train features (holdout_split; ties -> the stronger one),
  then the classifier is refit on all train features and scored on the test features.

  This is the precomputed-feature protocol of CLIP's linear probes (Radford et al. 2021: L-BFGS
  logistic regression on features extracted once, L2 strength swept on a validation split), not
  the augmented SGD probe of MoCo-v3 / DINO (90-100 epochs, as solo-learn's linear evaluation also
  runs), which passes the frozen backbone augmented images every epoch: no augmentation here, so
  it is far cheaper and can land a little below that. Deterministic: the only randomness is the
  seeded held-out split.

  Args:
    train_feats, test_feats: [N, D] / [M, D] float features (computed in float32).
    train_labels, test_labels: [N] / [M] integer class labels in [0, num_classes).
    weight_decay_grid: non-negative L2 strengths on the mean loss, tried in turn.
    val_fraction: share of the train features held out to pick the weight decay, in [0, 1);
      0 = no choice made, the strongest in the grid is used.
    seed: seed of the held-out split.
    num_classes: default max label + 1.
    max_iter, tol: L-BFGS stops after max_iter iterations or at a gradient norm below tol; 100 is
      within 0.1 point of convergence on 10000 features of width 128 and takes a few seconds.
  Returns:
    {"top1": test accuracy in [0, 1], "l2": the chosen weight decay, "val_top1": its held-out
    accuracy (0.0 without a held-out part), "iterations": L-BFGS iterations of the final fit}.
  Raises:
    ValueError: an empty or negative weight_decay_grid, val_fraction outside [0, 1), or features
      and labels of different lengths.
  """
  grid = tuple(float(w) for w in weight_decay_grid)
  if not grid or min(grid) < 0:
    raise ValueError(f"weight_decay_grid={weight_decay_grid} must be non-empty and >= 0")
  y = np.asarray(train_labels)
  test_y = np.asarray(test_labels)
  if len(y) != len(train_feats) or len(test_y) != len(test_feats):
    raise ValueError(f"{len(train_feats)} train / {len(test_feats)} test features but "
                     f"{len(y)} / {len(test_y)} labels")
  num_classes = _num_classes(y, test_y, num_classes)
  standardise = _standardiser(train_feats)
  x = jnp.asarray(standardise(train_feats), jnp.float32)
  labels = jnp.asarray(y, jnp.int32)
  val, _ = holdout_split(x.shape[0], val_fraction, seed)
  fit_weight = np.ones(x.shape[0], np.float32)
  fit_weight[val] = 0.0

  def fit(sample_weight, wd):
    return _fit_logistic(x, labels, jnp.asarray(sample_weight), jnp.float32(wd),
                         num_classes=num_classes, max_iter=max_iter, tol=jnp.float32(tol))

  def predict(params, f):
    return np.argmax(np.asarray(f @ params["w"] + params["b"]), axis=1)

  scores = {}
  for wd in grid:
    params, _ = fit(fit_weight, wd)
    scores[wd] = float(np.mean(predict(params, x[val]) == y[val])) if len(val) else 0.0
  best = max(grid, key=lambda wd: (scores[wd], wd))  # ties -> stronger regularisation
  params, iterations = fit(np.ones(x.shape[0], np.float32), best)
  test_x = jnp.asarray(standardise(test_feats), jnp.float32)
  top1 = float(np.mean(predict(params, test_x) == test_y))
  return {"top1": top1, "l2": best, "val_top1": scores[best], "iterations": int(iterations)}
