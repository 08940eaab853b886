"""Time-to-accuracy: the uncompressed baseline and the accelerated schedule, side by side, one command.

  python bench/time_to_accuracy.py --quick           # MoCo-v3, ~13 minutes on 2 CPU cores
  python bench/time_to_accuracy.py                   # the default budget, ~45 minutes on 2 CPU cores

Both runs are the embedded default recipe (configs/fmnist_<objective>.py) with the same seed and the
same compute budget; only `schedule` differs (`none` vs the recipe's own accelerated schedule, or
--schedules). They run one
after the other through main.py, exactly as a user would, and are evaluated (kNN and linear probe,
one fixed protocol for every point) at the same budget fractions. Reported, side by side: each run's
final kNN and linear-probe accuracy, training wall-clock (evaluations and compilation excluded) and
budget units, the wall-clock and units each needed to first reach the baseline's final kNN
(interpolated between evaluations; "not reached" if never), the speed-ups, and kNN-vs-wall-clock /
kNN-vs-budget plots. Output: bench/results/time_to_accuracy_<objective>[_quick].{md,json,png}.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax  # noqa: E402
import jax  # noqa: E402
import matplotlib  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vit_accel import io  # noqa: E402
from vit_accel import time_to_accuracy as tta  # noqa: E402
from vit_accel.metric_writer import read_metrics  # noqa: E402

flags.DEFINE_string("objective", "mocov3", "Which recipe: configs/fmnist_<objective>.py.")
flags.DEFINE_bool("quick", False, "A quarter of the default budget and a smaller eval protocol.")
flags.DEFINE_list("schedules", ["none", "recipe"], "Schedules to compare (presets, stage "
                  "strings, files such as --mode=search's schedule.txt, or 'recipe' = the config's "
                  "own schedule); the first is the baseline whose final kNN is the target.")
flags.DEFINE_string("workdir_root", "/tmp/vit_accel_tta", "Run directories go below this.")
flags.DEFINE_bool("reuse", False, "Keep existing run directories (a finished run is not re-run; "
                  "an interrupted one resumes). Default: start every run afresh.")
flags.DEFINE_string("out_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("extra", [], "More --config overrides for every run, e.g. seed=1.")
FLAGS = flags.FLAGS

# (budget_epochs, eval fractions, bank size, query size) of each variant. One eval protocol for every
# point of both runs, so the target accuracy and the curves are comparable.
VARIANTS = {
    "quick": dict(budget_epochs=0.25, at_progress=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
                  bank=2000, queries=1000),
    "full": dict(budget_epochs=0.85, at_progress=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                  0.8, 0.9), bank=5000, queries=2500),
}


def run_once(schedule: str, workdir: str, variant: dict) -> float:
  recipe = os.path.join(ROOT, "configs", f"fmnist_{FLAGS.objective}.py")
  if not os.path.exists(recipe):
    raise app.UsageError(f"no recipe {recipe} for --objective={FLAGS.objective}")
  # A schedule that names a file (e.g. --mode=search's schedule.txt) is passed as schedule_file.
  if schedule == "recipe":
    chosen = {}
  elif os.path.isfile(schedule):
    chosen = {"schedule_file": os.path.abspath(schedule)}
  else:
    chosen = {"schedule": schedule}
  overrides = {
      **chosen, "budget_epochs": variant["budget_epochs"],
      "eval.every_steps": 0, "eval.at_start": True,
      "eval.at_progress": str(tuple(variant["at_progress"])),
      "eval.bank_size": variant["bank"], "eval.final_bank_size": variant["bank"],
      "eval.query_size": variant["queries"], "eval.final_query_size": variant["queries"],
  }
  for item in FLAGS.extra:
    key, _, value = item.partition("=")
    overrides[key] = value
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={recipe}",
         f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  print("$ " + " ".join(cmd[1:]), flush=True)
  t0 = time.time()
  subprocess.run(cmd, check=True, cwd=ROOT)
  return time.time() - t0


def summarise(name: str, schedule: str, workdir: str) -> dict:
  evals = [m for m in read_metrics(workdir, kind="eval") if "evaluated_by" not in m]
  final = evals[-1]
  with open(os.path.join(workdir, "plan.json")) as f:
    plan = json.load(f)
  return {"name": name, "schedule": schedule, "workdir": workdir,
          "final_knn": final["knn_top1"], "final_linear": final.get("linear_top1"),
          "init_knn": evals[0]["knn_top1"] if evals[0]["step"] == 0 else None,
          "train_wall_s": final["train_wall_s"], "budget_units": final["budget_units"],
          "steps": final["step"],
          "stages": [f"{s['spec']} x{s['num_steps']}" for s in plan["stages"]],
          "wall_curve": tta.eval_curve(workdir, "train_wall_s"),
          "budget_curve": tta.eval_curve(workdir, "budget_units")}


def plot(runs: list[dict], target: float, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], "wall_curve", "training wall-clock (s)"),
                         (axes[1], "budget_curve", "budget units (base forwards)")):
    for r in runs:
      xs, ys = zip(*r[key])
      ax.plot(xs, ys, marker="o", label=f"{r['name']} ({r['schedule']})")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="baseline final kNN")
    ax.set_xlabel(label)
    ax.set_ylabel("kNN top-1")
    ax.grid(alpha=0.3)
  axes[0].legend(loc="lower right")
  fig.suptitle(f"Time to accuracy, {FLAGS.objective}: same budget, same seed")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fmt_s(x):
  return "not reached" if x is None else f"{x:.0f} s"


def fmt_x(comparison: dict) -> str:
  if not comparison["reached"]:
    return "not reached"
  if comparison["speedup"] is None:
    return "n/a (target met at the start)"
  return f"{comparison['speedup']:.2f}x"


def markdown(results: dict) -> str:
  runs, base = results["runs"], results["runs"][0]
  lines = [f"# Time to accuracy: {FLAGS.objective}, {results['variant']} variant", "",
           f"Machine: {results['machine']}. Versions: {results['versions']}. Date: "
           f"{results['date']}. Total bench wall-clock: {results['bench_wall_s'] / 60:.1f} min.", "",
           f"Command: `{results['command']}`", "",
           f"Both runs: the embedded default recipe, seed {results['seed']}, budget "
           f"{results['budget_epochs']} full-cost epochs ({results['budget']:.4g} units). kNN "
           f"(k=20, T=0.07) and linear probe (ridge) on {results['bank']} train-split / "
           f"{results['queries']} test-split images at every point, evaluated at budget fractions "
           f"{', '.join(map(str, results['at_progress']))} and at the end. Wall-clock = training "
           f"only (evaluations and compilation excluded). Target = the baseline's final kNN "
           f"({base['final_knn']:.4f}).", "",
           "| run | schedule (stages x steps) | final kNN | final linear | train wall-clock | "
           "to target: wall-clock | to target: budget | speed-up (wall) | speed-up (budget) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in runs:
    w, b = r["vs_baseline_wall"], r["vs_baseline_budget"]
    stages = "; ".join(r["stages"]).replace("|", "\\|")  # '|' would split the table cell
    units = "not reached" if b["accelerated_x"] is None else f"{b['accelerated_x']:.3g} units"
    lines.append(
        f"| {r['name']} | {stages} | {r['final_knn']:.4f} | "
        f"{r['final_linear']:.4f} | {r['train_wall_s']:.0f} s | {fmt_s(w['accelerated_x'])} | "
        f"{units} | {fmt_x(w)} | {fmt_x(b)} |")
  lines += ["", f"kNN at initialisation: {base['init_knn']:.4f}.", "",
            f"![kNN vs wall-clock and budget]({os.path.basename(results['plot'])})", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  variant_name = "quick" if FLAGS.quick else "full"
  variant = VARIANTS[variant_name]
  suffix = "_quick" if FLAGS.quick else ""
  root = os.path.join(FLAGS.workdir_root, f"{FLAGS.objective}{suffix}")
  t0 = time.time()
  runs = []
  for i, schedule in enumerate(FLAGS.schedules):
    name = ("baseline" if i == 0 else "accelerated" if schedule in ("recipe", "dynamic")
            else "searched" if os.path.isfile(schedule) else schedule)
    workdir = os.path.join(root, f"{i}_{name if os.path.isfile(schedule) else schedule}"
                           .replace(":", "_").replace(";", "_").replace(" ", ""))
    if not FLAGS.reuse and os.path.exists(workdir):
      shutil.rmtree(workdir)
    run_once(schedule, workdir, variant)
    runs.append(summarise(name, schedule, workdir))
  bench_wall = time.time() - t0

  base = runs[0]
  with open(os.path.join(base["workdir"], "plan.json")) as f:
    budget = json.load(f)["budget"]
  extra = dict(item.partition("=")[::2] for item in FLAGS.extra)
  for r in runs:
    r["vs_baseline_wall"] = tta.speedup(base["wall_curve"], r["wall_curve"])
    r["vs_baseline_budget"] = tta.speedup(base["budget_curve"], r["budget_curve"])

  # Versions only; the runs themselves were separate processes.
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stem = os.path.join(FLAGS.out_dir, f"time_to_accuracy_{FLAGS.objective}{suffix}")
  results = {
      "objective": FLAGS.objective, "variant": variant_name, "runs": runs,
      "budget_epochs": float(extra.get("budget_epochs", variant["budget_epochs"])),
      "budget": budget, "at_progress": list(variant["at_progress"]),
      "bank": variant["bank"], "queries": variant["queries"], "seed": int(extra.get("seed", 0)),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}"
                 f" {jax.devices()[0].platform}".replace("  ", " "),
      "versions": f"python {platform.python_version()}, jax {jax.__version__}, flax "
                  f"{flax.__version__}, optax {optax.__version__}",
      "date": time.strftime("%Y-%m-%d"), "bench_wall_s": bench_wall,
      "command": "python bench/time_to_accuracy.py " + " ".join(sys.argv[1:]),
      "plot": stem + ".png"}
  plot(runs, base["final_knn"], results["plot"])
  io.atomic_write_json(stem + ".json", results)
  text = markdown(results)
  io.atomic_write_text(stem + ".md", text)
  print(text, flush=True)


if __name__ == "__main__":
  app.run(main)
