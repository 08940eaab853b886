"""Every bad input we guard against, tried for real: the line printed, the exit code, and whether the
run directory's existing checkpoints came through untouched. Writes a markdown table.

  python bench/bad_inputs.py --out=bench/results/bad_inputs.md      # ~8 minutes on 2 CPU cores

Each case runs `main.py` against a copy of one real run directory (the smoke recipe stopped at step
4, holding genuine checkpoints at steps 2 and 4); "untouched" compares every file's bytes before and
after. The file-system cases mount small tmpfs file systems (a read-only one; one too small for the
next checkpoint), which needs root; without it they are reported as not run. The tests
(tests/test_main.py, test_run_safety.py, test_config_domains.py, test_device_counts.py,
test_train.py, test_kill_resume.py, test_sources.py) assert the same behaviours; this script is the
human-readable record.
"""
from __future__ import annotations

import argparse
import atexit
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

from test_main import CASES  # noqa: E402  (the CLI cases the tests check, run here one by one)
from test_sources import make_image_folder  # noqa: E402
from vit_accel import io  # noqa: E402

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
  if lines:
    return lines[-1]
  return (stdout.strip().splitlines() or stderr.strip().splitlines() or ["(nothing)"])[-1]


def slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def mount_tmpfs(path: str, size: int) -> bool:
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True)
  return done.returncode == 0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="bench/results/bad_inputs.md")
  args = parser.parse_args()

  scratch = tempfile.mkdtemp(prefix="bad_inputs_")
  base = os.path.join(scratch, "base")
  subprocess.run([sys.executable, "main.py", SMOKE, f"--workdir={base}", *SMALL,
                  "--config.stop_at_step=4"], cwd=ROOT, env=env(), check=True,
                 capture_output=True)
  images = make_image_folder(os.path.join(scratch, "images"), per_class=(12, 4))

  cases = [(name, [*argv], 1) for name, (argv, _) in sorted(CASES.items())]
  run_8 = ["--config.compile_cache_dir=", "--config.tensorboard=False"]
  cases += [
      ("checkpoint with another head size", [SMOKE, *SMALL, "--config.mocov3.out_dim=32"], 1),
      ("... and allow_schedule_change=True", [SMOKE, *SMALL, "--config.mocov3.out_dim=32",
                                              "--config.allow_schedule_change=True"], 1),
      ("checkpoint of another seed", [SMOKE, *SMALL, "--config.seed=1"], 1),
      ("checkpoint of other augmentations", [SMOKE, *SMALL, "--config.aug.crop_scale=(0.5,1.0)"],
       1),
      ("checkpoint of another data set", [SMOKE, *SMALL, "--config.data.source=image_folder",
                                          f"--config.data.dir={images}"], 1),
      ("temperature 0", [SMOKE, *SMALL, "--config.mocov3.temperature=0"], 1),
      ("negative temperature", [SMOKE, *SMALL, "--config.mocov3.temperature=-0.2"], 1),
      ("momentum above 1", [SMOKE, *SMALL, "--config.mocov3.base_momentum=1.5"], 1),
      ("crop scale out of order", [SMOKE, *SMALL, "--config.aug.crop_scale=(0.9,0.2)"], 1),
      ("workdir under a regular file", [SMOKE, *SMALL], 1),
      ("workdir on a read-only mount", [SMOKE, *SMALL], 1),
      ("disk full mid-run", [SMOKE, *SMALL], 1),
      (":smoke on 8 devices, FSDP 2 (fresh workdir)", [SMOKE, *run_8, "--config.mesh.fsdp=2",
                                                       "--config.stop_at_step=12"], 8),
      ("... resumed on 1 device", [SMOKE, *run_8], 1),
      (":smoke on 3 devices (batch 64)", [SMOKE, *run_8], 3),
  ]
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
  mounts = []
  workdir = None
  for name, argv, devices in cases:
    if name.startswith("..."):       # continues the previous case's run directory
      pass
    elif "fresh workdir" in name or "3 devices" in name:
      workdir = os.path.join(scratch, slug(name))
    else:
      workdir = os.path.join(scratch, slug(name))
      shutil.copytree(base, workdir)
    if name == "workdir under a regular file":
      with open(os.path.join(scratch, "a_file"), "w") as fh:
        fh.write("not a directory")
      argv = [*argv, "--config.stop_at_step=6"]
      target = os.path.join(scratch, "a_file", "run")
    elif name in ("workdir on a read-only mount", "disk full mid-run"):
      mount = os.path.join(scratch, slug(name) + "_mnt")
      # Read-only: a copy of the run on a tmpfs remounted read-only. Full: the copy plus 1 MiB,
      # less than the next checkpoint needs.
      size = du(base) + 1024 * 1024
      if not mount_tmpfs(mount, size):
        rows.append(f"| {name} | not run here: mounting a tmpfs needs root | | |")
        continue
      mounts.append(mount)
      atexit.register(subprocess.run, ["umount", mount], check=False, capture_output=True)
      shutil.copytree(base, os.path.join(mount, "run"))
      workdir = os.path.join(mount, "run")
      if "read-only" in name:
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
      target = workdir
    else:
      target = workdir
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
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
    cmd = [sys.executable, "main.py", f"--workdir={target}", *argv]
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
    if "fresh workdir" in name or "3 devices" in name or name == "... resumed on 1 device":
      kept = f"(a fresh run) now {steps}"
    elif name in ("truncated latest checkpoint", "SIGTERM during training", "disk full mid-run"):
      kept = f"steps 2, 4 were there; now {steps}" + (
          f"; partial left: {partial}" if (partial := [d for d in os.listdir(ckpts)
                                                       if not d.isdigit()]) else "")
    else:
      kept = "untouched" if tree_digest(ckpts) == before else f"CHANGED (steps {steps})"
    text = message(stderr, stdout).replace("|", "\\|").replace(scratch, "$TMP")
    traceback = " (+ traceback)" if "Traceback" in stderr else ""
    rows.append(f"| {name} | `{text}`{traceback} | {code} | {kept} |")
    print(rows[-1], flush=True)

  for mount in mounts:
    subprocess.run(["umount", mount], check=False)
  header = [
      "# Bad inputs: what the user sees",
      "",
      f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
      f"Python {platform.python_version()}); command: `python bench/bad_inputs.py`.",
      "Exit codes: 2 = bad input (one `error:` line), 3 = preempted (checkpoint saved), 4 = a "
      "write failed mid-run (one `error:` line naming the last complete checkpoint), 0 = ran.",
      "Each case ran against a copy of a real run directory holding checkpoints at steps 2 and 4, "
      "except the '(a fresh run)' ones, which start an empty one.",
      "",
      "| case | printed | exit | existing checkpoints |",
      "| --- | --- | --- | --- |",
  ]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  io.atomic_write_text(args.out, "\n".join(header + rows) + "\n")
  shutil.rmtree(scratch, ignore_errors=True)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
