"""`--mode=grad_error`: how good is each compression strategy's gradient, at a given point of training?

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
Welford's update: one mean vector per strategy, never M copies. Writes WORKDIR/grad_error.json and
WORKDIR/grad_error.png (strategies x progress).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from vit_accel import checkpointing, compression
from vit_accel import sharding as sharding_lib
from vit_accel.compression import BranchStrategies
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
def candidate_strategies(config) -> list[BranchStrategies]:
  """Full length first (the reference), then grad_error.candidates."""
  return compression.full_then_candidates(config.grad_error.candidates, config.compression.bucket,
                                          config.model, "grad_error.candidates")


def saved_steps(workdir: str) -> dict[int, str]:
  """step -> checkpoint directory, over the rolling checkpoints and the milestones."""
  found = {}
  for sub in (checkpointing.MILESTONES, "checkpoints"):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory):
      for name in os.listdir(directory):
        if name.isdigit():
          found.setdefault(int(name), directory)
  return found


def make_grad_fns(config, model, strategies, state_shardings, mesh) -> dict:
  """strategies -> jitted (state, batch, rng, progress) -> flat float32 gradient of the objective
  w.r.t. the trained parameters (replicated)."""
  from vit_accel import train_step
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


def measurement_units(config, strategies, reference_batches: int, batches: int) -> float:
  """Budget units one `measure` call spends: a gradient costs what a train step of its strategy
  costs (forward + backward of the gradient branch, forward of the other)."""
  from vit_accel import train_step
  full, others = strategies[0], strategies[1:]
  per_sample = (reference_batches * train_step.step_cost_units(config, full)
                + batches * sum(train_step.step_cost_units(config, st) for st in others))
  return per_sample * config.batch_size


def run(config, workdir: str) -> dict:
  """Measures the table at every requested checkpoint of the run in `workdir`."""
  from input_pipeline import pipeline  # TensorFlow only here: batches come from tf.data
  from vit_accel import train, train_step

  train_step.validate_config(config)
  ge = config.grad_error
  strategies = candidate_strategies(config)
  available = saved_steps(workdir)
  if not available:
    raise UserError(f"no checkpoints in {workdir}/checkpoints or {workdir}/"
                    f"{checkpointing.MILESTONES}; train first (checkpoint.at_progress keeps "
                    f"checkpoints at chosen budget fractions)")
  milestones = {s for s, d in available.items() if d.endswith(checkpointing.MILESTONES)}
  if len(ge.steps):
    steps = sorted(int(s) for s in ge.steps)
  else:  # the milestones when the run kept some (they span the run), else the rolling checkpoints
    steps = sorted(milestones or available)
  missing = [s for s in steps if s not in available]
  if missing:
    raise UserError(f"grad_error.steps {missing} not saved in {workdir}; saved: "
                    f"{', '.join(map(str, sorted(available)))}")

  mesh = sharding_lib.make_mesh(config)
  sharding_lib.check_batch(config.batch_size, mesh)
  train_source = pipeline.load_source(config, "train")
  plan = train.make_step_plan(config, train_source.num_examples)
  model = train_step.build_model(config)
  tx = train_step.make_optimizer(config)
  _, abstract_state, state_shardings = train_step.state_layout(config, model, tx, mesh)
  target = checkpointing.abstract_with_shardings(abstract_state, state_shardings)
  split = pipeline.HostSplit(jax.process_index(), jax.process_count(), config.batch_size)

  grad_fns = make_grad_fns(config, model, strategies, state_shardings, mesh)
  costs = {st: train_step.step_cost_units(config, st) for st in strategies}

  t_start = time.time()
  tables = []
  for step in steps:
    t0 = time.time()
    ckpt = checkpointing.Checkpointer(available[step], keep=None, every_steps=1, async_save=False,
                                      read_only=True)
    try:
      ckpt.check_compatible(step, target)   # a config of other shapes: one line, nothing read
      state, _ = ckpt.restore(step, target)
    finally:
      ckpt.close()
    # The batches this run would have seen next: R for g*, then the same M for every strategy.
    stream = pipeline.train_dataset(train_source, config, split, start_step=step)
    batches = stream.as_numpy_iterator()
    global_batches = [sharding_lib.host_to_global(next(batches), mesh)
                      for _ in range(ge.reference_batches + ge.batches)]
    rows = measure(config, state, global_batches, ge.reference_batches, grad_fns, costs,
                   jax.random.fold_in(jax.random.key(config.seed), 7919 + step),
                   plan.progress_at(step))
    tables.append({"step": step, "progress": plan.progress_at(step), "rows": rows,
                   "seconds": time.time() - t0})
    logging.info("grad_error at step %d (%.0f%% of the budget) in %.0fs", step,
                 100 * plan.progress_at(step), time.time() - t0)
    print(format_table(tables[-1]), flush=True)

  result = {"workdir": workdir, "batch_size": int(config.batch_size),
            "reference_batches": int(ge.reference_batches), "batches": int(ge.batches),
            "tables": tables, "seconds": time.time() - t_start}
  if jax.process_index() == 0:
    path = os.path.join(workdir, "grad_error.json")
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    heatmap(tables, os.path.join(workdir, "grad_error.png"))
    print(f"wrote {path} and grad_error.png ({result['seconds']:.0f}s)", flush=True)
  return result


def format_table(table: dict) -> str:
  head = (f"step {table['step']} ({100 * table['progress']:.0f}% of the budget), values / "
          f"||g*||^2 = {table['rows'][0]['grad_norm2']:.3g}\n"
          f"{'strategy':<22} {'bias2':>9} {'variance':>9} {'cost':>6} {'CA-MSE':>9} {'cosine':>7}")
  lines = [head]
  for r in table["rows"]:
    lines.append(f"{r['strategy']:<22} {r['bias2']:>9.4f} {r['variance']:>9.4f} "
                 f"{r['cost_units']:>6.2f} {r['ca_mse']:>9.4f} {r['cosine']:>7.3f}")
  return "\n".join(lines)


def heatmap(tables: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [r["strategy"] for r in tables[0]["rows"]]
  cols = [f"{100 * t['progress']:.0f}%" for t in tables]
  fig, axes = plt.subplots(1, 3, figsize=(4 + 1.6 * len(cols) * 3, 0.5 * len(names) + 2))
  for ax, key in zip(axes, ("bias2", "variance", "ca_mse")):
    values = np.array([[next(r[key] for r in t["rows"] if r["strategy"] == n) for t in tables]
                       for n in names])
    image = ax.imshow(np.log10(np.maximum(values, 1e-6)), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
    ax.set_xlabel("budget progress of the checkpoint")
    ax.set_title(f"{key} / ||g*||^2 (log10)")
    for i in range(len(names)):
      for j in range(len(cols)):
        ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
