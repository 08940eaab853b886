"""Plots and tables of runs (no display needed): what --mode=report (vit_accel/modes/report.py) draws
from one or more run directories, and --mode=grad_error's heat-map.

draw_runs writes into a folder (WORKDIR/report/ for --mode=report):
  schedule.png          gradient-branch sequence length vs budget progress, per run
  knn_vs_wall.png       kNN top-1 vs wall-clock, per run
  knn_vs_budget.png     kNN top-1 vs budget units, per run
  loss.png              training loss vs budget units and vs wall-clock, per run
  stages.png            what each stage of the first run feeds the model: sample images with the
                        stage's patch grid, the tokens its dropout drops greyed out
summary_table: per run, final kNN, budget units, wall-clock, steps, stages.
grad_error_heatmap: bias2 / variance / CA-MSE of each strategy at each analysed checkpoint.

Importing this module needs neither JAX nor TensorFlow; only stages.png does (the stage's token
draws and the sample images), imported when it is drawn.
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vit_accel.errors import UserError  # noqa: E402
from vit_accel.metric_writer import read_metrics  # noqa: E402


def load_run(workdir: str) -> dict:
  """A run directory's name, plan.json (None when absent), train lines and training-time
  evaluations."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no metrics.jsonl; point --workdir (or --compare) at a run "
                    f"directory")
  plan = None
  if os.path.exists(os.path.join(workdir, "plan.json")):
    with open(os.path.join(workdir, "plan.json")) as f:
      plan = json.load(f)
  return {"name": os.path.basename(os.path.normpath(workdir)), "dir": workdir, "plan": plan,
          "train": read_metrics(workdir, kind="train"),
          # --mode=eval lines (evaluated_by) are extra measurements of saved checkpoints, not curve points
          "evals": [m for m in read_metrics(workdir, kind="eval") if "evaluated_by" not in m]}


def plot_curves(runs, x_key, y_key, which, xlabel, ylabel, title, path, step=False):
  """y_key against x_key of every run's `which` lines ('train' or 'evals'), one line per run."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for run in runs:
    rows = [r for r in run[which] if x_key in r and y_key in r]
    if not rows:
      continue
    xs, ys = [r[x_key] for r in rows], [r[y_key] for r in rows]
    if step:
      ax.step(xs, ys, where="pre", label=run["name"])
    else:
      ax.plot(xs, ys, marker="o" if which == "evals" else None, ms=3, label=run["name"])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_stages(run: dict, config, path: str, num_images: int = 3) -> None:
  """Sample test images with each stage's patch grid; dropped tokens greyed out."""
  # Lazy: the only part of a report that needs JAX (token draws) and the input pipeline (TF).
  import jax

  from input_pipeline import pipeline
  from vit_accel import compression

  images, _ = pipeline.eval_arrays(pipeline.load_source(config, "test"), config.model.image_size,
                                   num_images, seed=0)
  stages = run["plan"]["stages"]
  m = config.model
  fig, axes = plt.subplots(num_images, len(stages), figsize=(2.2 * len(stages), 2.2 * num_images),
                           squeeze=False)
  for j, st in enumerate(stages):
    strategy = compression.BranchStrategies.parse(st["spec"], config.compression.bucket).query
    lay = strategy.layout(m.image_size, m.patch_size)
    idx = np.asarray(compression.keep_indices(jax.random.key(j), num_images, lay.num_patches,
                                              lay.kept))
    for i in range(num_images):
      img = np.asarray(jax.image.resize(images[i].astype(np.float32),
                                        (lay.input_size, lay.input_size, images.shape[-1]),
                                        "linear")) / 255.0
      mask = np.zeros(lay.num_patches, bool)
      mask[idx[i]] = True
      mask = np.kron(mask.reshape(lay.grid, lay.grid), np.ones((lay.patch_size,) * 2)) > 0
      shown = np.where(mask[..., None], img, 0.35 + 0.3 * img)
      ax = axes[i, j]
      ax.imshow(shown.clip(0, 1), cmap="gray", vmin=0, vmax=1)
      for k in range(1, lay.grid):
        ax.axhline(k * lay.patch_size - 0.5, color="tab:orange", lw=0.6)
        ax.axvline(k * lay.patch_size - 0.5, color="tab:orange", lw=0.6)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(f"stage {j}: {strategy.spec}\npatch {lay.patch_size}, {lay.kept}/"
                     f"{lay.num_patches} tokens", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary_table(runs) -> str:
  """Per run: final kNN, budget units, wall-clock, the share of training spent waiting for input
  with the accelerator idle ('-' for runs logged before it was measured), steps and stages, as
  printed text."""
  head = (f"{'run':<24} {'final kNN':>9} {'budget units':>13} {'wall':>8} {'input wait':>10} "
          f"{'steps':>6}  stages")
  lines = [head, "-" * len(head)]
  for run in runs:
    final = run["evals"][-1] if run["evals"] else {}
    last = run["train"][-1] if run["train"] else {}
    stages = " -> ".join(s["spec"] for s in run["plan"]["stages"]) if run["plan"] else "?"
    knn = f"{final['knn_top1']:.4f}" if final else "-"
    wait = (f"{100 * last['input_wait_s'] / last['train_wall_s']:.1f}%"
            if last.get("input_wait_s") is not None and last.get("train_wall_s") else "-")
    lines.append(f"{run['name']:<24} {knn:>9} {last.get('budget_units', 0):>13.4g} "
                 f"{final.get('wall_s', last.get('wall_s', 0)):>7.0f}s {wait:>10} "
                 f"{last.get('step', 0):>6}  {stages}")
  return "\n".join(lines)


def draw_runs(runs: list[dict], config, out: str) -> list[str]:
  """Every plot of `runs` (load_run) into the folder `out`; stages.png from the first run's plan
  when it has one (skipped, with a line saying why, when its data is not on this machine). Returns
  the paths written."""
  written = []

  def target(name):
    written.append(os.path.join(out, name))
    return written[-1]

  plot_curves(runs, "budget_progress", "seq_len", "train", "budget progress (units spent / budget)",
              "gradient-branch tokens per view", "compression schedule", target("schedule.png"),
              step=True)
  plot_curves(runs, "wall_s", "knn_top1", "evals", "wall-clock (s)", "kNN top-1",
              "kNN accuracy vs wall-clock", target("knn_vs_wall.png"))
  plot_curves(runs, "budget_units", "knn_top1", "evals", "budget units (base forwards)",
              "kNN top-1", "kNN accuracy vs compute", target("knn_vs_budget.png"))
  plot_curves(runs, "budget_units", "loss", "train", "budget units (base forwards)", "loss",
              "training loss vs compute", target("loss.png"))
  plot_curves(runs, "wall_s", "loss", "train", "wall-clock (s)", "loss",
              "training loss vs wall-clock", target("loss_vs_wall.png"))
  if runs[0]["plan"]:
    try:
      plot_stages(runs[0], config, target("stages.png"))
    except UserError as e:  # e.g. the dataset is not on this machine: the other plots still stand
      written.pop()
      print(f"stages.png skipped: {e}")
  return written


def grad_error_heatmap(tables: list[dict], path: str) -> None:
  """bias2, variance and CA-MSE (each / ||g*||^2, log colour scale) of every strategy (rows) at
  every analysed checkpoint (columns, by budget progress) of --mode=grad_error's tables; each cell
  shows the value and, where the table has them, its interval [low, high] below it. In the CA-MSE
  panel the strategy of lowest CA-MSE is boxed and those whose intervals overlap it (tied) are
  marked with '=' (search.ties='interval')."""
  names = [r["strategy"] for r in tables[0]["rows"]]
  cols = [f"{100 * t['progress']:.0f}%" for t in tables]
  fig, axes = plt.subplots(1, 3, figsize=(4 + 2.0 * len(cols) * 3, 0.6 * len(names) + 2))

  def cell(table, name):
    return next(r for r in table["rows"] if r["strategy"] == name)

  for ax, key in zip(axes, ("bias2", "variance", "ca_mse")):
    values = np.array([[cell(t, n)[key] for t in tables] for n in names])
    image = ax.imshow(np.log10(np.maximum(values, 1e-6)), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
    ax.set_xlabel("budget progress of the checkpoint")
    ax.set_title(f"{key} / ||g*||^2 (log10)")
    for i, name in enumerate(names):
      for j, table in enumerate(tables):
        row = cell(table, name)
        ci = row.get(f"{key}_ci")
        text = f"{values[i, j]:.3g}" + (f"\n[{ci[0]:.2g}, {ci[1]:.2g}]" if ci else "")
        if key == "ca_mse" and ci and all("ca_mse_ci" in r for r in table["rows"]):
          best = min(table["rows"], key=lambda r: r["ca_mse"])
          if row is best:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="w", lw=2))
          elif ci[0] <= best["ca_mse_ci"][1]:
            text = "= " + text
        ax.text(j, i, text, ha="center", va="center", color="w", fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
