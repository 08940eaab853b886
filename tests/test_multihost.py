"""A 2-process cluster on 127.0.0.1 (2 simulated CPU devices each, 4 in the mesh): each process reads
its own shard and the global batch is assembled across processes; the run is stopped at a step,
checkpointed, resumed by both processes, and ends where an uninterrupted 2-process run ends."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_multidevice import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_cluster(workdir, *extra, processes=2):
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke", f"--workdir={workdir}",
       *TINY, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}",
       "--config.distributed.timeout_s=120", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  outputs = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=420)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(err)
    assert p.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f], outputs


def logged_losses(stderr: str) -> dict:
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r"step (\d+)/\d+ .* loss ([0-9.]+)", stderr)}


@pytest.mark.slow
def test_two_process_cluster_trains_checkpoints_and_resumes(tmp_path):
  whole, _ = run_cluster(str(tmp_path / "whole"))
  workdir = str(tmp_path / "resumed")
  first, logs = run_cluster(workdir, "--config.stop_at_step=3")
  assert "process 0 of 2, 2 local / 4 global devices" in logs[0]
  assert "process 1 of 2, 2 local / 4 global devices" in logs[1]
  assert logged_losses(logs[0]) == logged_losses(logs[1])     # one global computation
  assert [l["step"] for l in first if "loss" in l] == [1, 2, 3]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  rest, logs = run_cluster(workdir)
  assert all("resumed from" in log and "at step 3" in log for log in logs)
  losses = lambda lines: [l["loss"] for l in lines if "loss" in l]  # noqa: E731
  assert [l["step"] for l in rest if "loss" in l] == list(range(1, 8))
  np.testing.assert_allclose(losses(rest), losses(whole), rtol=1e-5)
  knn = lambda lines: [l["knn_top1"] for l in lines if "knn_top1" in l]  # noqa: E731
  assert knn(rest) == pytest.approx(knn(whole), abs=1e-6) and knn(rest)
