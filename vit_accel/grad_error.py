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

Gradients are flattened with ravel_pytree on device and accumulated on the host in float64 with
Welford's update: one mean vector per strategy, never M copies.

The maths only: --mode=grad_error (vit_accel/modes/grad_error.py) runs it at a run's checkpoints and
writes WORKDIR/grad_error.json (+ the heat-map, report.grad_error_heatmap); the online schedule
(online.py) runs it during training.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from vit_accel import sharding as sharding_lib
from vit_accel import train_step
from vit_accel.errors import UserError


class GradientMoments:
  """Streaming mean vector and total variance of vectors (Welford, float64)."""

  def __init__(self):
    self.n = 0
    self.mean = None
    self._m2 = 0.0

  def add(self, g) -> None:
    g = np.asarray(g, np.float64).ravel()
    self.n += 1
    if self.mean is None:
      self.mean = g.copy()
      return
    delta = g - self.mean
    self.mean += delta / self.n
    self._m2 += float(delta @ (g - self.mean))

  @property
  def variance(self) -> float:
    """mean over samples of ||g - mean||^2, unbiased (n - 1)."""
    return self._m2 / (self.n - 1) if self.n > 1 else 0.0


def error_terms(reference: GradientMoments, candidate: GradientMoments, cost_units: float,
                ref_cost_units: float) -> dict:
  """The table row of one strategy against the reference (see the module docstring)."""
  g_star = reference.mean
  norm2 = float(g_star @ g_star)
  if norm2 <= 0:
    raise UserError("the reference gradient is zero; nothing to compare against")
  diff = candidate.mean - g_star
  plugin = float(diff @ diff)
  noise = candidate.variance / candidate.n + reference.variance / reference.n
  bias2 = max(plugin - noise, 0.0)
  variance = candidate.variance
  cost_ratio = cost_units / ref_cost_units
  cosine = float(candidate.mean @ g_star / (np.linalg.norm(candidate.mean) * np.sqrt(norm2)
                                            + 1e-300))
  return {"bias2": bias2 / norm2, "bias2_plugin": plugin / norm2, "variance": variance / norm2,
          "cost_units": cost_units, "ca_mse": (bias2 + variance * cost_ratio) / norm2,
          "cosine": cosine, "grad_norm2": norm2, "num_batches": candidate.n}


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


def measure(config, state, global_batches, reference_batches: int, grad_fns: dict, costs: dict,
            rng, progress: float) -> list[dict]:
  """One table: g* from the first `reference_batches` batches at full length, then every other
  strategy of `grad_fns` (full length first) on the remaining batches, at the objective's schedules
  for budget `progress`. Identical on every host."""
  progress = np.float32(progress)
  strategies = list(grad_fns)
  full = strategies[0]

  def moments(st, chunk, offset):
    acc = GradientMoments()
    for i, batch in enumerate(chunk):
      r = jax.random.fold_in(rng, offset + i)  # token-keep draws differ per batch
      acc.add(sharding_lib.to_host(grad_fns[st](state, batch, r, progress)))
    return acc

  reference = moments(full, global_batches[:reference_batches], 0)
  measured = global_batches[reference_batches:]
  rows = []
  for st in strategies:
    # Full length is the reference estimator itself: no bias by definition, its variance is the
    # reference batches' (not measured again).
    acc = reference if st == full else moments(st, measured, reference_batches)
    q, k = st.layouts(config.model.image_size, config.model.patch_size)
    rows.append({"strategy": st.spec, "seq_len": q.seq_len, "key_seq_len": k.seq_len,
                 **error_terms(reference, acc, costs[st], costs[full])})
  return rows


def format_table(table: dict) -> str:
  """One checkpoint's table ({step, progress, rows}) as printed text."""
  head = (f"step {table['step']} ({100 * table['progress']:.0f}% of the budget), values / "
          f"||g*||^2 = {table['rows'][0]['grad_norm2']:.3g}\n"
          f"{'strategy':<22} {'bias2':>9} {'variance':>9} {'cost':>6} {'CA-MSE':>9} {'cosine':>7}")
  lines = [head]
  for r in table["rows"]:
    lines.append(f"{r['strategy']:<22} {r['bias2']:>9.4f} {r['variance']:>9.4f} "
                 f"{r['cost_units']:>6.2f} {r['ca_mse']:>9.4f} {r['cosine']:>7.3f}")
  return "\n".join(lines)
