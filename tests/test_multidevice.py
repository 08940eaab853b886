"""The same run on 1 and on 8 (simulated) devices computes the same thing: the batch is sharded over
the mesh, and BatchNorm / InfoNCE statistics stay global-batch statistics; with mesh.fsdp the state
really is sharded, and a checkpoint written on 8 devices continues on 4 and then on 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # full smoke runs on 1, 4 and 8 simulated devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smoke recipe's two stages (token keep 25% on both branches, then full length) at batch 16:
# about 6 + 1 steps, so compression runs sharded too.
TINY = ["--config.batch_size=16", "--config.budget=400", "--config.log_every_steps=1",
        "--config.tensorboard=False", "--config.eval.at_start=False", "--config.eval.bank_size=400",
        "--config.eval.query_size=200", "--config.eval.final_bank_size=400",
        "--config.eval.final_query_size=200", "--config.eval.batch_size=200",
        "--config.compile_cache_dir="]   # the test session's compile cache, not the user's


def run(workdir, devices, *extra):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke",
                         f"--workdir={workdir}", *TINY, *extra], cwd=ROOT, env=env, capture_output=True,
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


SHARDING_PROBE = """
import jax
from configs import fmnist_mocov3
from vit_accel import optimizer, sharding, state
c = fmnist_mocov3.get_config()
c.mesh.fsdp = 2
mesh = sharding.make_mesh(c)
model = state.build_model(c)
_, abstract, shardings = state.state_layout(c, model, optimizer.make_optimizer(c), mesh)
fc1 = shardings.params['backbone']['block0']['mlp']['fc1']
mu = shardings.opt_state[0].mu['backbone']['block0']['mlp']['fc1']['kernel']
print(dict(mesh.shape), fc1['kernel'].spec, fc1['bias'].spec, mu.spec,
      shardings.params['backbone']['pos_embed'].spec,
      shardings.ema_params['backbone']['block0']['mlp']['fc1']['kernel'].spec)
"""


def test_fsdp_shards_large_leaves_and_a_checkpoint_from_8_devices_continues_on_4_then_1(
    tmp_path, needs_fashion_mnist):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", SHARDING_PROBE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
  assert probe.returncode == 0, probe.stderr[-2000:]
  # fc1 kernel [128, 512]: split on its 512 side; the bias and pos_embed stay whole; the Adam moment
  # and the EMA copy follow the parameter.
  assert probe.stdout.split() == ["{'data':", "4,", "'fsdp':", "2}", "P(None,",
                                  "'fsdp')", "P()", "P(None,", "'fsdp')",
                                  "P()", "P(None,", "'fsdp')"], probe.stdout
  one = run(str(tmp_path / "one"), 1)
  # FSDP on 8 devices, stopped after 3 steps, continued on 4 devices to step 5, then on 1 device
  # from that checkpoint: each restore lays the state out for the mesh at hand.
  workdir = str(tmp_path / "fsdp")
  first = run(workdir, 8, "--config.mesh.fsdp=2", "--config.stop_at_step=3")
  middle = run(workdir, 4, "--config.stop_at_step=5")
  rest = run(workdir, 1)
  losses = lambda lines: [l["loss"] for l in lines if "loss" in l]  # noqa: E731
  assert [l["step"] for l in first if "loss" in l] == [1, 2, 3]
  assert [l["step"] for l in middle if "loss" in l] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose(losses(rest), losses(one), rtol=2e-4)   # the whole run, same numbers
