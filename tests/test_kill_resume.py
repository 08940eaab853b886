"""SIGKILL a multi-stage run five times at random moments, re-run the same command: the final
parameters equal an uninterrupted run's, bit for bit. SIGTERM saves the current step and exits 3."""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow   # subprocess runs killed and re-run: minutes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two stages (25% tokens on both branches, then full length), ~24 steps at batch 16, a checkpoint
# every 2 steps, small evaluations.
FLAGS = ["--config=configs/fmnist_mocov3.py:smoke", "--config.batch_size=16",
         "--config.budget=1800", "--config.checkpoint.every_steps=2", "--config.log_every_steps=1",
         "--config.tensorboard=False",
         "--config.eval.final_bank_size=400", "--config.eval.final_query_size=200",
         "--config.eval.batch_size=200"]


def command(workdir):
  # A compile cache of the test's own (beside its run directories): each re-run loads the steps
  # the first run compiled, as a user's re-run would, instead of compiling them again.
  cache = os.path.join(os.path.dirname(workdir), "xla")
  return [sys.executable, "main.py", f"--workdir={workdir}", *FLAGS,
          f"--config.compile_cache_dir={cache}"]


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def final_params(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  last = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  return last, ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(last), "state"))


def saved_steps(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return {int(d) for d in os.listdir(ckpt_dir) if d.isdigit()} if os.path.isdir(ckpt_dir) else set()


KILLS = 5


def test_five_sigkills_at_random_points_then_rerun_matches_uninterrupted(tmp_path,
                                                                         needs_fashion_mnist):
  straight = str(tmp_path / "straight")
  done = subprocess.run(command(straight), cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]

  killed = str(tmp_path / "killed")
  rng = random.Random(os.getpid())
  for kill in range(KILLS):
    before = max(saved_steps(killed), default=0)
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Wait until this attempt has made progress (a checkpoint newer than the last one), then kill it
    # at a random moment: mid-step, mid-save or between the two.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if max(saved_steps(killed), default=0) > before:
        break
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    was_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert was_running, f"the run finished before kill {kill + 1}; lengthen it"

  again = subprocess.run(command(killed), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  step_a, a = final_params(straight)
  step_b, b = final_params(killed)
  assert step_a == step_b
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_saves_the_current_step_and_exits_3(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 3, stderr[-2000:]
  line = [l for l in stderr.splitlines() if l.startswith("preempted:")]
  assert line, stderr[-2000:]
  step = int(line[0].split("after step ")[1].split(";")[0])
  saved = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert saved == step   # the step the signal interrupted is checkpointed, off the 2-step interval too
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert not any('"knn_top1"' in l for l in f)   # stopped early: no final evaluation
