"""The budget sweep on a GPU: all three objectives, budgets up to 16 full-cost epochs, in one run.

  python bench/gpu_sweep.py --data_dir=DIR --out_dir=OUT         # on a CUDA machine, ~8 minutes
  python bench/gpu_sweep.py --tiny --budgets=0.02,0.04 --low_budgets= --out_dir=/tmp/gpu_sweep
                                                                  # its code path on a CPU

For each objective (configs/fmnist_<objective>.py): bench/budget_sweep.py with the baseline and the
recipe's accelerated arm, each at the (base_lr, batch) the CPU sweep tuned for it
(--settings_dir/budget_sweep_<objective>.json: not re-tuned here), at --budgets, the accelerated
arm also at --low_budgets (so its curve reaches below the baseline's smallest budget). The views
are made on the GPU (data.augment_on=device): the GPU machine needs no TensorFlow, and its host
does not have to keep up with the step. The three sweeps run at once, one process each (the
embedded models are small; one GPU holds the three), and a run predicted to end after --deadline_s
is not started (runs go in budget order, so what is left out is the largest budgets, and the
report says so). Every finished run is in <out_dir>/budget_sweep_<objective>_<tag>.jsonl at once,
and the report is rewritten whenever a sweep ends: a call cut short keeps what it finished, and a
second call given the same files (on a lent machine: carried back into --out_dir) runs only what
is missing.

Does the input keep up? Before the sweeps, for each recipe at its accelerated arm's batch: the
views made on the device alone, in images/s (device_views through streams.DeviceStream, timed
after warm-up), and tf.data's on the host where TensorFlow imports (pipeline.train_dataset, the
host path); after them, each run's input wait (the loop's time blocked on the next batch while the
device had nothing queued) as a share of its training time, and each accelerated run's images/s,
which its input has to match. With views made on the device the input wait stays near 0 by
construction (making a batch is queued device work): their cost is inside the step time, which is
why the probe times them alone. The report (<out_dir>/gpu_sweep_<tag>.md / .json) has the three
speed-up tables, the input figures and the runs that did not fit.

On the lent H200 (no dataset package, no ml_collections, no TensorFlow there): copy the four
Fashion-MNIST .gz files (/usr/share/datasets/fashion-mnist) and the ml-collections wheel into
ignored folders of the repository, carry them, install the wheel to a --target and put it on
PYTHONPATH, and pass --data_dir; see bench/results/README.md for the exact command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The three sweeps and this process share the GPU: none may take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags  # noqa: E402

from vit_accel import io  # noqa: E402

flags.DEFINE_list("objectives", ["mocov3", "simclr", "dino"], "Which recipes.")
flags.DEFINE_list("budgets", ["1", "4", "16"], "Full-cost epochs, both arms.")
flags.DEFINE_list("low_budgets", ["0.25", "0.5"], "Full-cost epochs, the accelerated arm only.")
flags.DEFINE_float("deadline_s", 480.0, "Every run must end within this many seconds of the start: "
                   "a run predicted to end later is not started (budget_sweep's --end_by).")
flags.DEFINE_bool("parallel", True, "The objectives' sweeps at once (one process each).")
flags.DEFINE_string("data_dir", "", "Fashion-MNIST's four .gz files ('' = the Debian package's).")
flags.DEFINE_string("settings_dir", os.path.join(ROOT, "bench", "results"),
                    "Where the CPU sweeps' reports (budget_sweep_<objective>.json) are.")
flags.DEFINE_string("out_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_string("workdir_root", "/tmp/vit_accel_gpu_sweep", "Run directories go below this.")
flags.DEFINE_string("tag", "", "Result files' suffix ('' = the device, e.g. nvidia_h200).")
flags.DEFINE_list("extra", [], "More --config overrides for every run.")
flags.DEFINE_bool("tiny", False, "Smoke recipes, tiny budgets: checks the code path on a CPU.")
flags.DEFINE_integer("probe_batches", 20, "Timed batches of the input-throughput probe.")
FLAGS = flags.FLAGS


def device_name() -> tuple[str, str]:
  """(device kind, platform) of JAX's first device, e.g. ('NVIDIA H200', 'gpu')."""
  import jax
  d = jax.devices()[0]
  return d.device_kind, d.platform


def sweep_command(objective: str, tag: str, end_by: float, extra: list[str]) -> list[str]:
  """bench/budget_sweep.py for one objective with the CPU sweep's settings and this sweep's plan."""
  budgets = FLAGS.budgets
  low = FLAGS.low_budgets
  return [sys.executable, os.path.join(ROOT, "bench", "budget_sweep.py"),
          f"--objective={objective}", f"--tag={tag}", f"--out_dir={FLAGS.out_dir}",
          f"--workdir_root={FLAGS.workdir_root}",
          f"--settings_from={os.path.join(FLAGS.settings_dir, f'budget_sweep_{objective}.json')}",
          f"--budgets={','.join(budgets)}", f"--low_budgets={','.join(low)}", "--extra_seeds=",
          f"--end_by={end_by:.0f}", f"--extra={','.join(extra)}"] + (
              ["--config_arg=smoke"] if FLAGS.tiny else [])


def run_extra() -> list[str]:
  extra = ["data.augment_on=device", "tensorboard=False",
           f"compile_cache_dir={os.path.join(FLAGS.workdir_root, 'xla_cache')}"]
  if FLAGS.data_dir:
    extra.append(f"data.dir={os.path.abspath(FLAGS.data_dir)}")
  return extra + list(FLAGS.extra)


def probe_inputs(objective: str, batch: int) -> dict:
  """images/s of the views made on the device (and by tf.data on the host, where TensorFlow
  imports) for the recipe at `batch`."""
  import importlib

  import jax
  import numpy as np

  from input_pipeline import pipeline, sources, streams, tf_runtime
  from vit_accel import sharding
  config = importlib.import_module(f"configs.fmnist_{objective}").get_config(
      "smoke" if FLAGS.tiny else None)
  config.batch_size = batch
  config.data.augment_on = "device"
  config.data.dir = os.path.abspath(FLAGS.data_dir) if FLAGS.data_dir else ""
  source = sources.load(config, "train")
  shard = pipeline.HostShard(0, 1, batch)
  mesh = sharding.make_mesh(config)
  out = {"objective": objective, "batch": batch, "views_per_image": 2 + int(config.aug.local_crops)}

  def rate(stream, block) -> float:
    for _ in range(3):   # warm-up (compilation, first transfers, tf.data's pool)
      block(next(stream))
    t0 = time.perf_counter()
    for _ in range(FLAGS.probe_batches):
      block(next(stream))
    return FLAGS.probe_batches * batch / (time.perf_counter() - t0)

  device = streams.global_batches(source, config, shard, mesh)
  out["device_images_per_s"] = rate(device, jax.block_until_ready)
  if tf_runtime.available():
    host = pipeline.train_dataset(source, config, shard).as_numpy_iterator()
    out["host_images_per_s"] = rate(host, lambda b: np.asarray(b["views"][0]))
    out["host_cpus"] = os.cpu_count()
  else:
    out["host_images_per_s"] = None   # TensorFlow not importable on this machine
  return out


def accelerated_batch(objective: str) -> int:
  path = os.path.join(FLAGS.settings_dir, f"budget_sweep_{objective}.json")
  with open(path) as f:
    return int(json.load(f)["best"]["accelerated"][1])


def load_report(objective: str, tag: str) -> dict | None:
  path = os.path.join(FLAGS.out_dir, f"budget_sweep_{objective}_{tag}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_report(tag: str, device: str, probes: list, sweeps: dict, seconds: float) -> None:
  """gpu_sweep_<tag>.md / .json: per objective the speed-ups, each run's input wait, the probe."""
  lines = [f"# Budget sweep on {device}", "",
           f"Written by `python bench/gpu_sweep.py {' '.join(sys.argv[1:])}` on "
           f"{time.strftime('%Y-%m-%d')} in {seconds:.0f} s. Views made on the device "
           "(data.augment_on=device); each arm at the CPU sweep's tuned (base_lr, batch); the "
           f"objectives' sweeps {'ran at once on the one device, so wall-clock figures are of a shared device' if FLAGS.parallel else 'ran one after another'}. "
           "Budget speed-ups do not depend on that. With views made on the device the input wait "
           "is near 0 by construction: their cost is in the step time (the probe times them "
           "alone). Each objective's full report: "
           f"budget_sweep_<objective>_{tag}.md.", "",
           "## Does the input keep up?", "",
           "| recipe | batch | views / image | device views img/s | tf.data img/s (host) | "
           "accelerated run img/s (fastest) | largest input wait |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for p in probes:
    runs = (sweeps.get(p["objective"]) or {}).get("runs", [])
    fastest = max((r["steps"] * r["batch_size"] / r["train_wall_s"] for r in runs
                   if r["arm"] == "accelerated" and r["train_wall_s"] > 0), default=None)
    wait = max(((r.get("input_wait_s") or 0.0) / r["train_wall_s"] for r in runs
                if r["train_wall_s"] > 0), default=None)
    host = ("not importable" if p["host_images_per_s"] is None else
            f"{p['host_images_per_s']:.0f} ({p['host_cpus']} CPUs)")
    lines.append(f"| {p['objective']} | {p['batch']} | {p['views_per_image']} | "
                 f"{p['device_images_per_s']:.0f} | {host} | "
                 f"{'-' if fastest is None else f'{fastest:.0f}'} | "
                 f"{'-' if wait is None else f'{wait:.1%}'} |")
  for objective, rep in sweeps.items():
    lines += ["", f"## {objective}", ""]
    if rep is None:
      lines.append("No run finished.")
      continue
    lines += ["| baseline budget | baseline kNN | accelerated budget needed | speed-up (budget) | "
              "speed-up (wall) |", "|---:|---:|---:|---:|---:|"]
    for row in rep["speedups"]:
      e = row["arms"].get("accelerated")
      if not e or e.get("budget_epochs") is None:
        lines.append(f"| {row['budget_epochs']:g} | {row['target']:.4f} | not reached | | |")
        continue
      le, ge = ("<= ", ">= ") if e["at_most"] else ("", "")
      flag = " (extrapolated)" if e["extrapolated"] else ""
      lines.append(f"| {row['budget_epochs']:g} | {row['target']:.4f} | "
                   f"{le}{e['budget_epochs']:.3g}{flag} | {ge}{e['speedup_budget']:.2f}x | "
                   f"{ge}{e['speedup_wall']:.2f}x |")
    lines += ["", "| arm | budget | final kNN | train wall | input wait |",
              "|---|---:|---:|---:|---:|"]
    for r in sorted(rep["runs"], key=lambda r: (r["arm"], r["budget_epochs"])):
      wait = (r.get("input_wait_s") or 0.0) / r["train_wall_s"] if r["train_wall_s"] else 0.0
      lines.append(f"| {r['arm']} | {r['budget_epochs']:g} | {r['final_knn']:.4f} | "
                   f"{r['train_wall_s']:.1f} s | {wait:.1%} |")
    if rep.get("not_started"):
      lines.append("")
      lines.append("Out of time (predicted to end after --deadline_s), not run: "
                   + ", ".join(rep["not_started"]) + ".")
  stem = os.path.join(FLAGS.out_dir, f"gpu_sweep_{tag}")
  io.atomic_write_text(stem + ".md", "\n".join(lines) + "\n")
  io.atomic_write_json(stem + ".json", {"device": device, "probes": probes, "sweeps": sweeps,
                                        "seconds": seconds})


def main(argv):
  del argv
  started = time.time()
  end_by = started + FLAGS.deadline_s
  kind, platform_name = device_name()
  device = f"{kind} ({platform_name})"
  tag = FLAGS.tag or ("cpu_tiny" if FLAGS.tiny else kind.replace(" ", "_").lower())
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  extra = run_extra()
  probes = []
  for objective in FLAGS.objectives:
    batch = 16 if FLAGS.tiny else accelerated_batch(objective)
    probes.append(probe_inputs(objective, batch))
    print(f"input probe {probes[-1]}", flush=True)

  def report():   # rewritten whenever something finishes: a run cut short keeps what it had
    sweeps = {objective: load_report(objective, tag) for objective in FLAGS.objectives}
    write_report(tag, device, probes, sweeps, time.time() - started)

  report()
  pending, failed = [], []
  for objective in FLAGS.objectives:
    cmd = sweep_command(objective, tag, end_by, extra)
    print("$ " + " ".join(cmd[1:]), flush=True)
    pending.append((objective, subprocess.Popen(cmd, cwd=ROOT)))
    if not FLAGS.parallel:
      _, proc = pending.pop()
      failed += [objective] if proc.wait() else []
      report()
  while pending:
    time.sleep(1)
    for item in [p for p in pending if p[1].poll() is not None]:
      pending.remove(item)
      failed += [item[0]] if item[1].returncode else []
      report()
  report()
  print(open(os.path.join(FLAGS.out_dir, f"gpu_sweep_{tag}.md")).read(), flush=True)
  if failed:
    raise SystemExit(f"error: the sweep of {', '.join(failed)} failed (its error is above)")


if __name__ == "__main__":
  app.run(main)
