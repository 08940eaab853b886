"""Any device count: every shipped recipe's evaluation runs on 1, 2, 3, 4 and 8 devices without
overrides (its batch is padded to the mesh), a train batch that does not divide the devices fails
before anything compiles, and the `:smoke` recipe trains with FSDP on 8 devices and resumes on 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json, sys
import jax, numpy as np
from jax.sharding import AxisType, Mesh
import importlib
from vit_accel import evaluation, optimizer, sharding, state as state_lib
from vit_accel.errors import UserError
from vit_accel.evaluator import Evaluator
rng = np.random.default_rng(0)
bank = rng.integers(0, 256, (61, 32, 32, 1), np.uint8)
queries = rng.integers(0, 256, (29, 32, 32, 1), np.uint8)
out = {}
for recipe in ("fmnist_mocov3", "fmnist_simclr", "fmnist_dino"):
  config = importlib.import_module("configs." + recipe).get_config("smoke")
  model = state_lib.build_model(config)
  for n in (1, 2, 3, 4, 8):
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(n, 1), sharding.BATCH_AXES,
                axis_types=(AxisType.Auto, AxisType.Auto))
    try:
      sharding.check_batch(config.batch_size, mesh)
      train_ok = True
    except UserError:
      train_ok = False
    init, _, shardings = state_lib.state_layout(config, model, optimizer.make_optimizer(config),
                                                mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    evaluator = Evaluator(config, model, mesh, shardings, bank, queries)
    result = evaluator(state_lib.eval_params(config, state), final=True)
    feats = evaluation.extract_features(evaluator.feature_fn, state_lib.eval_params(config, state),
                                        evaluator.arrays("test", -1)[0], evaluator.batch_size, mesh)
    out[f"{recipe}/{n}"] = [train_ok, config.eval.batch_size, evaluator.batch_size,
                            result["knn_queries"], feats.tolist(), result["knn_top1"]]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_recipe_evaluates_on_1_2_3_4_8_devices_and_the_train_batch_is_checked(
    needs_fashion_mnist):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for recipe in ("fmnist_mocov3", "fmnist_simclr", "fmnist_dino"):
    rows = {n: out[f"{recipe}/{n}"] for n in (1, 2, 3, 4, 8)}
    # The train batch (64) divides 1, 2, 4, 8 devices, not 3; eval.batch_size (500) divides none
    # of 3, 8 yet evaluation runs, padded to 501 / 504, on every count.
    assert [rows[n][0] for n in (1, 2, 3, 4, 8)] == [True, True, False, True, True]
    assert [rows[n][2] for n in (1, 2, 3, 4, 8)] == [500, 500, 501, 500, 504]
    assert all(rows[n][3] == 29 for n in rows)
    # The same features and kNN whatever the device count (the padding rows are dropped).
    for n in (2, 3, 4, 8):
      np.testing.assert_allclose(rows[n][4], rows[1][4], atol=1e-5, err_msg=f"{recipe} {n}")
      assert rows[n][5] == rows[1][5], (recipe, n)


@pytest.mark.slow
def test_smoke_trains_with_fsdp_on_8_devices_then_resumes_on_1(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")

  def run(devices, *extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke",
                           f"--workdir={workdir}", "--config.compile_cache_dir=",
                           "--config.tensorboard=False", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

  first = run(8, "--config.mesh.fsdp=2", "--config.stop_at_step=12")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "on 8 devices" in first.stderr
  rest = run(1)
  assert rest.returncode == 0, rest.stderr[-3000:]
  assert "resumed from" in rest.stderr and "at step 12" in rest.stderr
  assert "final kNN top-1" in rest.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == sorted(steps) and steps[-1] == 24


def test_a_train_batch_the_devices_do_not_divide_fails_before_compiling(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "main.py", "--config=configs/fmnist_mocov3.py:smoke",
                         f"--workdir={tmp_path / 'run'}", "--config.compile_cache_dir="], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "batch_size=64 is not divisible by the 3 devices" in errors[0], errors
  assert "compiled step" not in proc.stderr
