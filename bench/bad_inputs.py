"""Every bad input we guard against, tried for real: the line printed, the exit code, and whether the
run directory's existing checkpoints came through untouched. Writes a markdown table.

  python bench/bad_inputs.py --out=bench/results/bad_inputs.md      # ~6 minutes on 2 CPU cores

Each case runs `main.py` against a copy of one real run directory (the smoke recipe stopped at step
4, holding genuine checkpoints at steps 2 and 4); "untouched" compares every file's bytes before and after.
The tests (tests/test_cli.py, test_train.py, test_kill_resume.py, test_sources.py) assert the same
behaviours; this script is the human-readable record.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
SMOKE = "--config=configs/fmnist_mocov3.py:smoke"
SMALL = ["--config.batch_size=16", "--config.budget=4000", "--config.checkpoint.every_steps=2",
         "--config.tensorboard=False",
         "--config.eval.final_bank_size=400", "--config.eval.final_query_size=200",
         "--config.eval.batch_size=200", "--config.compile_cache_dir="]


def tree_digest(path: str) -> str:
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in sorted(os.walk(path)):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def env(devices: int = 1):
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def message(stderr: str, stdout: str) -> str:
  lines = [l for l in (stdout + "\n" + stderr).splitlines()
           if l.startswith(("error:", "preempted:", "warning:"))]
  return lines[-1] if lines else (stderr.strip().splitlines() or ["(nothing)"])[-1]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="bench/results/bad_inputs.md")
  args = parser.parse_args()
  from test_cli import CASES
  from test_sources import make_image_folder

  scratch = tempfile.mkdtemp(prefix="bad_inputs_")
  base = os.path.join(scratch, "base")
  subprocess.run([sys.executable, "main.py", SMOKE, f"--workdir={base}", *SMALL,
                  "--config.stop_at_step=4"], cwd=ROOT, env=env(), check=True,
                 capture_output=True)
  images = make_image_folder(os.path.join(scratch, "images"), per_class=(12, 4))

  cases = [(name, [*argv], 1) for name, (argv, _) in sorted(CASES.items())]
  cases += [
      ("checkpoint of another model", [SMOKE, *SMALL, "--config.model.width=32"], 1),
      ("checkpoint of another schedule", [SMOKE, *SMALL, "--config.schedule=none"], 1),
      ("batch not divisible by devices", [SMOKE, *SMALL, "--config.batch_size=12"], 8),
      ("unreadable image, bad_images=fail",
       [SMOKE, *SMALL, "--config.data.source=image_folder", f"--config.data.dir={images}",
        "--config.data.bad_images=fail", "--config.allow_schedule_change=True"], 1),
      ("NaN / Inf loss", [SMOKE, *SMALL, "--config.optim.base_lr=1e38",
                          "--config.optim.warmup_fraction=0.0"], 1),
      ("truncated latest checkpoint", [SMOKE, *SMALL, "--config.stop_at_step=6"], 1),
      ("SIGTERM during training", [SMOKE, *SMALL], 1),
  ]
  rows = []
  for name, argv, devices in cases:
    workdir = os.path.join(scratch, name.replace(" ", "_").replace("/", "_"))
    shutil.copytree(base, workdir)
    if name == "truncated latest checkpoint":
      # Step 4 (the latest) loses half of every file; it is moved aside and step 2 is used.
      for dirpath, _, filenames in os.walk(os.path.join(workdir, "checkpoints", "4")):
        for f in filenames:
          p = os.path.join(dirpath, f)
          size = os.path.getsize(p)
          if size > 64:
            with open(p, "r+b") as fh:
              fh.truncate(size // 2)
    before = tree_digest(os.path.join(workdir, "checkpoints"))
    cmd = [sys.executable, "main.py", f"--workdir={workdir}", *argv]
    if name == "SIGTERM during training":
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
      metrics = os.path.join(workdir, "metrics.jsonl")
      deadline = time.time() + 300   # wait for a step past the copied checkpoint, then signal
      while proc.poll() is None and time.time() < deadline:
        with open(metrics) as fh:
          if '"step": 8,' in fh.read():
            break
        time.sleep(0.2)
      proc.send_signal(signal.SIGTERM)
      stdout, stderr = proc.communicate(timeout=300)
      code = proc.returncode
    else:
      done = subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True, text=True,
                            timeout=600)
      stdout, stderr, code = done.stdout, done.stderr, done.returncode
    ckpts = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    if name in ("truncated latest checkpoint", "SIGTERM during training"):
      kept = f"steps 2, 4 were there; now {steps}"
    else:
      kept = "untouched" if tree_digest(ckpts) == before else f"CHANGED (steps {steps})"
    text = message(stderr, stdout).replace("|", "\\|").replace(scratch, "$TMP")
    traceback = " (+ traceback)" if "Traceback" in stderr else ""
    rows.append(f"| {name} | `{text}`{traceback} | {code} | {kept} |")
    print(rows[-1], flush=True)

  header = [
      "# Bad inputs: what the user sees",
      "",
      f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
      f"Python {platform.python_version()}); command: `python bench/bad_inputs.py`.",
      "Exit codes: 2 = bad input (one `error:` line), 3 = preempted (checkpoint saved), 0 = ran.",
      "Each case ran against a copy of a real run directory holding checkpoints at steps 2 and 4.",
      "",
      "| case | printed | exit | existing checkpoints |",
      "| --- | --- | --- | --- |",
  ]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(header + rows) + "\n")
  shutil.rmtree(scratch, ignore_errors=True)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
