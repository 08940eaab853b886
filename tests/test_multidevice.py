"""The same run on 1 and on 8 (simulated) devices computes the same thing: the batch is sharded over
the mesh, and BatchNorm / InfoNCE statistics stay global-batch statistics."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smoke recipe's two stages (token keep 25% on both branches, then full length) at batch 16:
# about 6 + 1 steps, so compression runs sharded too.
TINY = ["--config.batch_size=16", "--config.budget=400", "--config.log_every_steps=1",
        "--config.tensorboard=False", "--config.eval.at_start=False", "--config.eval.bank_size=400",
        "--config.eval.query_size=200", "--config.eval.final_bank_size=400",
        "--config.eval.final_query_size=200", "--config.eval.batch_size=200"]


def run(workdir, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke",
                         f"--workdir={workdir}", *TINY], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"on {devices} devices" in proc.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_eight_devices_match_one(tmp_path, needs_fashion_mnist):
  one = run(str(tmp_path / "one"), 1)
  eight = run(str(tmp_path / "eight"), 8)
  losses = lambda lines: [l["loss"] for l in lines if "loss" in l]
  assert len({l["seq_len"] for l in one if "loss" in l}) == 2
  np.testing.assert_allclose(losses(eight), losses(one), rtol=2e-4)
  knn = lambda lines: [l["knn_top1"] for l in lines if "knn_top1" in l]
  np.testing.assert_allclose(knn(eight), knn(one), atol=0.011)
