"""Gradient error: how good is each compression strategy's gradient, at a given point of training?

For each checkpoint (step) analysed: the reference gradient g* is the mean of R uncompressed batch
gradients; every candidate strategy then gives M batch gradients on the *same* M further batches
(common random numbers, so strategies differ only by their compression). The full-length row is the
reference estimator itself (bias 0, the reference batches' variance). Per strategy, normalised by
||g*||^2 (the paper's bias, variance and cost-adjusted MSE of a compressed gradient; Lin et al.,
NeurIPS 2024):

  bias2     ||mean_m g_m - g*||^2, less its finite-sample noise var/M + var_ref/R (clipped at 0): the
            plug-in value alone would rank strategies by estimator noise when M is small;
            `bias2_plugin` keeps the paper's plain form.
  variance  mean_m ||g_m - mean g||^2 (unbiased, M-1), per batch of the analysed batch size.
  ca_mse    bias2 + variance * cost_units / cost_units(full): at a fixed compute per update a
            strategy of cost c affords a batch c_ref / c times larger, which divides its variance.
  cosine    between mean_m g_m and g*.

Metric (`grad_error.metric`): "euclidean" measures these in the raw gradient's coordinates, as the
paper does. "adam" measures them after dividing each coordinate by AdamW's step denominator at the
checkpoint, sqrt(nu_hat) + eps (nu_hat the bias-corrected second-moment estimate; Kingma & Ba
2015): the space in which the optimiser turns a gradient into an update, so an error in a
coordinate Adam scales down counts for less (`adam_scale`).

Intervals: gradients are flattened with ravel_pytree on device and kept on the host for one
strategy at a time (M vectors, plus the R reference ones), only long enough to take their Gram
matrices; every term is a quadratic form in per-batch weights, so Efron's bootstrap over batches
(`grad_error.bootstrap` draws, the same batch draws for every strategy: paired) costs no further
gradients. A measurement runs in rounds of fresh batches, pooled, until the strategy of lowest
CA-MSE is clear of the others or measured to `grad_error.ci_target`, at most
`grad_error.max_rounds` rounds (adaptive sample size).

The maths only: --mode=grad_error (vit_accel/modes/grad_error.py) runs it at a run's checkpoints and
writes WORKDIR/grad_error.json (+ the heat-map, report.grad_error_heatmap); the online schedule
(online.py) runs it during training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree

from vit_accel import optimizer, train_step
from vit_accel import sharding as sharding_lib
from vit_accel.config_domains import DOMAINS
from vit_accel.errors import UserError


def gram_terms(rr, cc, cr, w, v, cost_ratio: float) -> dict:
  """The table row's terms from Gram matrices, for one or many weightings of the batches.

  rr [R, R] = <reference batch gradients>, cc [M, M] = <candidate batch gradients>, cr [M, R] =
  <candidate, reference> (float64). w [K, R] and v [K, M] weight the batches (rows sum to 1):
  uniform rows give the estimate itself, multinomial counts / n give bootstrap draws (the same v
  rows for every strategy of a round: batch m is the same images for all, so the draws are paired).
  Every term is a quadratic form in the weights, so no gradient vector is needed after the Grams.
  Returns {name: [K] float64} for bias2, bias2_plugin, variance, ca_mse, cosine, grad_norm2 (the
  module docstring defines them) and bias2_raw (bias2 before clipping at 0, what pooling averages)
  and cost_ratio. A candidate that is the reference itself (cc is rr, v is w) has bias 0 by
  definition.
  """
  r, m = rr.shape[0], cc.shape[0]
  norm2 = np.einsum("kr,rs,ks->k", w, rr, w)
  if np.any(norm2 <= 0):
    raise UserError("the reference gradient is zero; nothing to compare against")
  var_ref = r / (r - 1) * (w @ np.diag(rr) - norm2)
  if cc is rr and v is w:
    zero = np.zeros_like(norm2)
    return {"bias2": zero, "bias2_raw": zero, "bias2_plugin": zero, "variance": var_ref / norm2,
            "ca_mse": var_ref * cost_ratio / norm2, "cosine": np.ones_like(norm2),
            "grad_norm2": norm2, "cost_ratio": np.full_like(norm2, cost_ratio)}
  mean2 = np.einsum("km,mn,kn->k", v, cc, v)
  var = m / (m - 1) * (v @ np.diag(cc) - mean2)
  cross = np.einsum("km,mr,kr->k", v, cr, w)
  plugin = np.maximum(mean2 - 2 * cross + norm2, 0.0)
  raw = plugin - var / m - var_ref / r
  bias2 = np.maximum(raw, 0.0)
  return {"bias2": bias2 / norm2, "bias2_raw": raw / norm2, "bias2_plugin": plugin / norm2,
          "variance": var / norm2, "ca_mse": (bias2 + var * cost_ratio) / norm2,
          "cosine": cross / (np.sqrt(np.maximum(mean2, 0.0) * norm2) + 1e-300),
          "grad_norm2": norm2, "cost_ratio": np.full_like(norm2, cost_ratio)}


def bootstrap_weights(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
  """[draws + 1, n]: row 0 uniform (the estimate), then `draws` multinomial resamples / n
  (Efron's bootstrap over batches)."""
  counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws)
  return np.concatenate([np.full((1, n), 1.0 / n), counts / n])


TERMS = ("bias2", "variance", "ca_mse")


def bias_corrected(values: np.ndarray) -> np.ndarray:
  """[draws + 1] estimate and bootstrap draws -> the same with the draws shifted by the bootstrap's
  bias estimate, mean(draws) - estimate (Efron & Tibshirani, An Introduction to the Bootstrap,
  1993, ch. 10), so that they centre on the estimate.

  Why: a resample of n batches repeats some, so its unbiased variance is (n - 1) / n of the
  sample's on average, and the norm of its mean is inflated by the mean's noise; the noise-corrected
  bias2 of a resample therefore centres on the plug-in value, not on the corrected one. The
  gradients have millions of coordinates, so these shifts are far larger than the draws' spread:
  uncorrected, the percentile interval of an unbiased candidate's bias2 excludes 0 and the
  variance's excludes its own estimate (tests/test_grad_error.py, 8 + 6 batches)."""
  out = np.array(values, dtype=np.float64)   # a copy: the caller's draws stay as they are
  out[1:] -= out[1:].mean() - out[0]
  return out


def pool_rounds(rounds: list[dict], level: float) -> list[dict]:
  """Rows pooled over independent rounds, with intervals.

  Each round is an independent replicate, so the pooled value of a term is the mean of the rounds'
  values and its bootstrap distribution is the rounds' draws averaged draw by draw. bias2 is pooled
  before clipping at 0 (averaging clipped values would keep an upward bias that more rounds cannot
  remove), then clipped, and CA-MSE rebuilt from it; bias2_plugin is the mean of the rounds'
  plug-in values. The draws of bias2 (before clipping) and of the variance are `bias_corrected`
  first. Intervals: the central `level` share of the draws (`<term>_ci` = [low, high]);
  `ca_mse_diff_ci[other]` is the same for this row's CA-MSE minus the other's, draw by draw (the
  draws are paired: every strategy of a round saw the same resampled batches), and
  `ca_mse_diff_p[other]` the share of draws in which this row's CA-MSE is not below the other's
  (a one-sided bootstrap p-value for "lower").
  rounds[i] = {spec: {term: [draws + 1] array}, '_rows', '_batches'}. Returns the first round's
  rows with the pooled terms, intervals, `num_batches` and `rounds`.
  """
  rows = [dict(r) for r in rounds[0]["_rows"]]
  tail = (1.0 - level) / 2

  def interval(values):
    return [float(np.quantile(values[1:], tail)), float(np.quantile(values[1:], 1.0 - tail))]

  pooled = {}
  for row in rows:
    spec = row["strategy"]
    mean = {term: np.mean([rnd[spec][term] for rnd in rounds], axis=0)
            for term in ("bias2_raw", "bias2_plugin", "variance", "cosine", "grad_norm2",
                         "cost_ratio")}
    raw, variance = (bias_corrected(mean[term]) for term in ("bias2_raw", "variance"))
    bias2 = np.maximum(raw, 0.0)
    values = {"bias2": bias2, "variance": variance,
              "ca_mse": bias2 + variance * mean["cost_ratio"],
              "bias2_plugin": mean["bias2_plugin"], "cosine": mean["cosine"],
              "grad_norm2": mean["grad_norm2"]}
    pooled[spec] = values
    for term, v in values.items():
      row[term] = float(v[0])
      if term in TERMS:
        row[f"{term}_ci"] = interval(v)
    row["num_batches"] = int(sum(rnd["_batches"][spec] for rnd in rounds))
    row["rounds"] = len(rounds)
  for row in rows:
    diffs = {other: pooled[row["strategy"]]["ca_mse"] - v["ca_mse"]
             for other, v in pooled.items() if other != row["strategy"]}
    row["ca_mse_diff_ci"] = {other: interval(d) for other, d in diffs.items()}
    row["ca_mse_diff_p"] = {other: float(np.mean(d[1:] >= 0.0)) for other, d in diffs.items()}
  return rows


def resolved(rows: list[dict], ci_target: float) -> bool:
  """Whether more batches could still change the pick: True when every other strategy's CA-MSE is
  higher than the lowest one's with confidence (the paired difference's interval is above 0), or
  the lowest one's interval is narrower than ci_target x its value (what is still unresolved is a
  tie at the precision asked for)."""
  best = min(rows, key=lambda r: r["ca_mse"])
  low, high = best["ca_mse_ci"]
  if high - low <= ci_target * best["ca_mse"]:
    return True
  return all(r is best or r["ca_mse_diff_ci"][best["strategy"]][0] > 0 for r in rows)


def gram(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
  """a [n, P] . b [m, P]^T in float64, converting `chunk` columns at a time (the vectors are kept
  in float32: half the host memory; the sums that bias2 subtracts need float64)."""
  out = np.zeros((a.shape[0], b.shape[0]), np.float64)
  for i in range(0, a.shape[1], chunk):
    out += a[:, i:i + chunk].astype(np.float64) @ b[:, i:i + chunk].astype(np.float64).T
  return out


METRICS = DOMAINS["grad_error.metric"].values   # one list: the config check's


def metric_of(config) -> str:
  """grad_error.metric; "euclidean" (the paper's) for configs saved before the key existed."""
  return config.grad_error.get("metric", "euclidean")


def _adam_state(opt_state):
  """The optimiser state's optax.ScaleByAdamState (AdamW's moments), found by its type so that
  other state in the chain (a schedule's step count) is not mistaken for it; None unless exactly
  one."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
  return found[0] if len(found) == 1 else None


def adam_scale(config, opt_state, mesh) -> np.ndarray:
  """[P] float32 on the host, in ravel_pytree's order of the parameters: 1 / (sqrt(nu_hat) + eps),
  the per-coordinate factor AdamW applies to a gradient (optax.scale_by_adam's denominator, eps
  optimizer.ADAM_EPS), from the second moment nu in `opt_state` bias-corrected by 1 - b2^count: the
  denominator of the checkpoint's last step (the next step's would also hold that step's gradient).
  Before the first step (count 0) every coordinate gets the same factor, i.e. the Euclidean
  metric. Coordinates whose nu is still 0 after steps have had no gradient (DINO's last layer
  while frozen: its updates are 0) and get 0, not 1 / eps, which would swamp every term. Gathered
  replicated over `mesh` (None: as jit places it). Raises UserError when the optimiser state holds
  no single AdamW moment state (another optimiser)."""
  adam = _adam_state(opt_state)
  if adam is None:
    raise UserError("grad_error.metric=adam needs the state of one AdamW (optax.scale_by_adam) in "
                    "the optimiser; this optimiser has none")
  b2 = float(config.optim.b2)

  def scale(nu, count):
    started = count > 0
    correction = jnp.where(started, 1.0 - b2 ** count.astype(jnp.float32), 1.0)
    factor = lambda v: jnp.where(started & (v == 0), 0.0,  # noqa: E731
                                 1.0 / (jnp.sqrt(v / correction) + optimizer.ADAM_EPS))
    return ravel_pytree(jax.tree.map(factor, nu))[0]

  gathered = {} if mesh is None else {"out_shardings": sharding_lib.replicated(mesh)}
  out = jax.jit(scale, **gathered)(adam.nu, adam.count)
  return np.asarray(sharding_lib.to_host(out), np.float32).ravel()


# ---------------------------------------------------------------------------- on a real model
def make_grad_fns(config, model, strategies, state_shardings, mesh) -> dict:
  """strategies -> jitted (state, batch, rng, progress) -> flat float32 gradient of the objective
  w.r.t. the trained parameters (replicated)."""
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  grad_fns = {}
  for st in strategies:
    loss_fn = train_step.make_loss_fn(config, model, st)

    def flat_grad(state, batch, rng, progress, loss_fn=loss_fn):
      grads = jax.grad(loss_fn, has_aux=True)(state.params, state.ema_params, state.extra, batch,
                                              rng, progress)[0]
      return ravel_pytree(grads)[0]

    grad_fns[st] = jax.jit(flat_grad, in_shardings=(state_shardings, batch_sharding, replicated,
                                                    replicated), out_shardings=replicated)
  return grad_fns


def batch_gradients(grad_fn, state, batches, rng, offset: int, progress,
                    scale: np.ndarray | None = None) -> np.ndarray:
  """[len(batches), P] float32 on the host: `grad_fn` (one of make_grad_fns') on each batch, the
  i-th with key fold_in(rng, offset + i) (token-keep draws differ per batch, and a batch's draw
  is the same whichever strategy or tool asks), times `scale` [P] (adam_scale) when given."""
  out = None
  for i, batch in enumerate(batches):
    g = np.asarray(sharding_lib.to_host(grad_fn(state, batch, jax.random.fold_in(rng, offset + i),
                                                progress)), np.float32).ravel()
    if out is None:
      out = np.empty((len(batches), g.size), np.float32)
    out[i] = g if scale is None else g * scale
  return out


def measure_round(config, state, global_batches, reference_batches: int, grad_fns: dict,
                  costs: dict, rng, progress: float, draws: int, seed,
                  cost_ratios: dict | None = None, scale: np.ndarray | None = None) -> dict:
  """One round: g* from the first `reference_batches` batches at full length, then every other
  strategy of `grad_fns` (full length first) on the remaining batches, at the objective's schedules
  for budget `progress`; the estimate and `draws` bootstrap draws of every term per strategy
  ({spec: {term: [draws + 1]}}, '_rows', '_batches'), the draws seeded by `seed` (a NumPy seed) so
  every host gets the same. Host memory: (reference_batches + batches) flat float32 gradients.
  CA-MSE weighs the variance by each strategy's step cost relative to
  full length: `cost_ratios[st]` (measured, --mode=cost) when given, else costs[st] / costs[full]
  (the analytic model). `scale` [P] (adam_scale), when given, multiplies every gradient first: the
  terms are then those of the preconditioned gradients."""
  progress = np.float32(progress)
  strategies = list(grad_fns)
  full = strategies[0]

  def gradients(st, chunk, offset):
    return batch_gradients(grad_fns[st], state, chunk, rng, offset, progress, scale)

  measured = global_batches[reference_batches:]
  gen = np.random.default_rng(seed)
  w = bootstrap_weights(gen, reference_batches, draws)
  v = bootstrap_weights(gen, len(measured), draws)     # shared by every strategy: paired draws
  ref = gradients(full, global_batches[:reference_batches], 0)
  rr = gram(ref, ref)
  out = {"_rows": [], "_batches": {}}
  for st in strategies:
    if st == full:
      # Full length is the reference estimator itself: no bias by definition, its variance is the
      # reference batches' (not measured again).
      terms = gram_terms(rr, rr, rr, w, w, 1.0)
      out["_batches"][st.spec] = reference_batches
    else:
      cand = gradients(st, measured, reference_batches)
      ratio = cost_ratios[st] if cost_ratios else costs[st] / costs[full]
      terms = gram_terms(rr, gram(cand, cand), gram(cand, ref), w, v, ratio)
      del cand
      out["_batches"][st.spec] = len(measured)
    out[st.spec] = terms
    q, k = st.layouts(config.model.image_size, config.model.patch_size)
    out["_rows"].append({"strategy": st.spec, "seq_len": q.seq_len, "key_seq_len": k.seq_len,
                         "cost_units": costs[st],
                         **({"cost_ratio": cost_ratios[st], "cost_source": "measured"}
                            if cost_ratios else {}),
                         **{name: float(values[0]) for name, values in terms.items()}})
  return out


def settled(rows: list[dict], ci_target: float, prior: str | None = None,
            min_batches: int = 0) -> bool:
  """Whether a measurement may stop: the pick is `resolved`, and with a prior strategy (`prior`,
  a spec) whose displacement takes `min_batches` batches (schedule_search.batches_to_displace),
  either the prior is the lowest or the lowest and the prior both rest on that many - a
  challenger resolved below the prior on fewer batches could not displace it, so it gets the
  rounds that let it."""
  if not resolved(rows, ci_target):
    return False
  if prior is None or not any(r["strategy"] == prior for r in rows):
    return True
  best = min(rows, key=lambda r: r["ca_mse"])
  if best["strategy"] == prior:
    return True
  incumbent = next(r for r in rows if r["strategy"] == prior)
  return min(best["num_batches"], incumbent["num_batches"]) >= min_batches


def measure(config, state, next_batches, reference_batches: int, batches: int, grad_fns: dict,
            costs: dict, rng, progress: float, *, max_rounds: int = 1, seed: int = 0,
            cost_ratios: dict | None = None, prior: str | None = None,
            min_batches: int = 0, mesh=None) -> list[dict]:
  """One table with intervals: rounds of `reference_batches` + `batches` fresh batches
  (`next_batches(n)` -> n global batches), pooled (pool_rounds), until the measurement is
  `settled` (grad_error.ci_target; `prior`, `min_batches`) or `max_rounds` rounds are spent.
  Intervals: the central grad_error.ci_level share of grad_error.bootstrap draws. In
  grad_error.metric's coordinates (the "adam" metric reads state.opt_state, gathered over `mesh`).
  Identical on every host."""
  ge = config.grad_error
  scale = adam_scale(config, state.opt_state, mesh) if metric_of(config) == "adam" else None
  rounds, rows = [], []
  for i in range(max_rounds):
    rounds.append(measure_round(config, state, next_batches(reference_batches + batches),
                                reference_batches, grad_fns, costs,
                                jax.random.fold_in(rng, 1_000_003 * i), progress,
                                int(ge.bootstrap), (seed, i), cost_ratios, scale))
    rows = pool_rounds(rounds, float(ge.ci_level))
    done = settled(rows, float(ge.ci_target), prior, min_batches)
    if jax.process_count() > 1:   # every host must run the same rounds: process 0 decides
      done = bool(multihost_utils.broadcast_one_to_all(np.array(done)))
    if done:
      break
  return rows


def format_table(table: dict) -> str:
  """One checkpoint's table ({step, progress, rows}) as printed text."""
  first = table["rows"][0]
  rounds = f", {first['rounds']} round(s)" if "rounds" in first else ""
  head = (f"step {table['step']} ({100 * table['progress']:.0f}% of the budget), values / "
          f"||g*||^2 = {first['grad_norm2']:.3g}{rounds}; [interval]\n"
          f"{'strategy':<22} {'bias2':>19} {'variance':>19} {'cost':>6} {'CA-MSE':>19} "
          f"{'cosine':>7}")
  lines = [head]

  def cell(r, term):
    ci = r.get(f"{term}_ci")
    return f"{r[term]:.4f}" + (f" [{ci[0]:.3f},{ci[1]:.3f}]" if ci else "")

  for r in table["rows"]:
    lines.append(f"{r['strategy']:<22} {cell(r, 'bias2'):>19} {cell(r, 'variance'):>19} "
                 f"{r['cost_units']:>6.2f} {cell(r, 'ca_mse'):>19} {r['cosine']:>7.3f}")
  return "\n".join(lines)
