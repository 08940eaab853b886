"""`--mode=report`: plots and a table from one or more run directories (no display needed).

Writes into WORKDIR/report/:
  schedule.png          gradient-branch sequence length vs budget progress, per run
  knn_vs_wall.png       kNN top-1 vs wall-clock, per run
  knn_vs_budget.png     kNN top-1 vs budget units, per run
  loss.png              training loss vs budget units and vs wall-clock, per run
  stages.png            what each stage of the first run feeds the model: sample images with the
                        stage's patch grid, the tokens its dropout drops greyed out
and prints a table: per run, final kNN, budget units, wall-clock, steps, stages.
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vit_accel.compression import BranchStrategies  # noqa: E402
from vit_accel.errors import UserError  # noqa: E402
from vit_accel.metric_writer import read_metrics  # noqa: E402


def load_run(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no metrics.jsonl; point --workdir (or --compare) at a run "
                    f"directory")
  plan = None
  if os.path.exists(os.path.join(workdir, "plan.json")):
    with open(os.path.join(workdir, "plan.json")) as f:
      plan = json.load(f)
  lines = read_metrics(workdir)
  return {"name": os.path.basename(os.path.normpath(workdir)), "dir": workdir, "plan": plan,
          "train": [l for l in lines if "loss" in l],
          # --mode=eval lines (evaluated_by) are extra measurements of saved checkpoints, not curve points
          "evals": [l for l in lines if "knn_top1" in l and "evaluated_by" not in l]}


def _plot(runs, x_key, y_key, which, xlabel, ylabel, title, path, step=False):
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
    strategy = BranchStrategies.parse(st["spec"], config.compression.bucket).query
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
  head = f"{'run':<24} {'final kNN':>9} {'budget units':>13} {'wall':>8} {'steps':>6}  stages"
  lines = [head, "-" * len(head)]
  for run in runs:
    final = run["evals"][-1] if run["evals"] else {}
    last = run["train"][-1] if run["train"] else {}
    stages = " -> ".join(s["spec"] for s in run["plan"]["stages"]) if run["plan"] else "?"
    knn = f"{final['knn_top1']:.4f}" if final else "-"
    lines.append(f"{run['name']:<24} {knn:>9} {last.get('budget_units', 0):>13.4g} "
                 f"{final.get('wall_s', last.get('wall_s', 0)):>7.0f}s {last.get('step', 0):>6}"
                 f"  {stages}")
  return "\n".join(lines)


def run(config, workdir: str, compare: list[str]) -> list[str]:
  runs = [load_run(d) for d in [workdir, *compare]]
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  written = []

  def target(name):
    written.append(os.path.join(out, name))
    return written[-1]

  _plot(runs, "budget_progress", "seq_len", "train", "budget progress (units spent / budget)",
        "gradient-branch tokens per view", "compression schedule", target("schedule.png"),
        step=True)
  _plot(runs, "wall_s", "knn_top1", "evals", "wall-clock (s)", "kNN top-1",
        "kNN accuracy vs wall-clock", target("knn_vs_wall.png"))
  _plot(runs, "budget_units", "knn_top1", "evals", "budget units (base forwards)", "kNN top-1",
        "kNN accuracy vs compute", target("knn_vs_budget.png"))
  _plot(runs, "budget_units", "loss", "train", "budget units (base forwards)", "loss",
        "training loss vs compute", target("loss.png"))
  _plot(runs, "wall_s", "loss", "train", "wall-clock (s)", "loss", "training loss vs wall-clock",
        target("loss_vs_wall.png"))
  if runs[0]["plan"]:
    try:
      plot_stages(runs[0], config, target("stages.png"))
    except UserError as e:  # e.g. the dataset is not on this machine: the other plots still stand
      written.pop()
      print(f"stages.png skipped: {e}")
  print(summary_table(runs))
  print("wrote " + ", ".join(written), flush=True)
  return written
