"""The training stream on the device (data.augment_on='device', input_pipeline/streams.py): batch
contract, replay on resume, the hosts' shards, local crops by step, one device vs eight, and the
config checks; the host stream's contract is tests/test_pipeline.py's."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from input_pipeline import pipeline, streams
from vit_accel import config_checks, sharding
from vit_accel.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_images(n=96, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def device_stream(images, config=None, batch=16, start_step=0, local_crops_by_step=None, host=0,
                  hosts=1):
  config = config or tiny_config(**{"data.augment_on": "device"})
  mesh = sharding.make_mesh(config)
  return streams.global_batches(images, config, pipeline.HostShard(host, hosts, batch), mesh,
                                start_step, local_crops_by_step)


def take(stream, k):
  return [jax.device_get(next(stream)) for _ in range(k)]


def test_device_batches_are_global_uint8_views():
  batch = next(device_stream(synthetic_images()))
  v0, v1 = batch["views"]
  assert isinstance(v0, jax.Array) and v0.sharding.is_equivalent_to(
      sharding.batch_sharding(sharding.make_mesh(tiny_config())), 4)
  for v in (np.asarray(v0), np.asarray(v1)):
    assert v.dtype == np.uint8 and v.shape == (16, 32, 32, 3)
    assert v.max() > 100
    np.testing.assert_array_equal(v[..., 0], v[..., 2])   # grey tiled to 3 channels
  assert not np.array_equal(v0, v1)


def test_device_stream_replays_on_resume_and_differs_by_seed():
  images = synthetic_images(n=40)     # 2 steps of 16 per epoch: the stream crosses epochs
  full = take(device_stream(images), 7)
  compiled = len(streams._VIEW_FNS)
  resumed = take(device_stream(images, start_step=3), 4)
  assert len(streams._VIEW_FNS) == compiled      # the second stream reuses the compiled views
  for x, y in zip(full[3:], resumed):
    for a, b in zip(x["views"], y["views"]):
      np.testing.assert_array_equal(a, b)
  other = take(device_stream(images, tiny_config(seed=1, **{"data.augment_on": "device"})), 1)
  assert not np.array_equal(full[0]["views"][0], other[0]["views"][0])


def test_each_host_reads_its_own_shard_once_per_epoch():
  images = synthetic_images(n=70)
  seen = []
  for host in range(2):
    stream = device_stream(images, host=host, hosts=2)   # local batch 8; 35 images per host
    rows = [stream.local_rows(step) for step in range(8)]  # 4 steps per epoch (32 of 35)
    first, second = (np.concatenate([r[0] for r in rows[i:i + 4]]) for i in (0, 4))
    assert len(set(first)) == 32 and len(set(second)) == 32   # no repeats within an epoch
    assert not np.array_equal(first, second)                  # a new order each epoch
    np.testing.assert_array_equal(np.concatenate([r[1] for r in rows]), np.arange(64))
    seen.append(set(first) | set(second))
  lo, hi = (min(s) for s in seen), (max(s) for s in seen)
  assert seen[0] <= set(range(35)) and seen[1] <= set(range(35, 70)), (list(lo), list(hi))


def test_local_crops_by_step_zero_the_unused_crops():
  config = tiny_config(recipe="dino", **{"data.augment_on": "device"})
  n = int(config.aug.local_crops)
  assert n >= 2
  # Step 0 trains on one local crop, step 1 on all, later steps on the last count (all).
  stream = device_stream(synthetic_images(), config, local_crops_by_step=((1, 1), (2, n)))
  first, second, third = take(stream, 3)
  assert first["local_views"][0].any() and not any(v.any() for v in first["local_views"][1:])
  assert all(v.any() for v in second["local_views"]) and all(v.any() for v in third["local_views"])
  # The made crop is the one an unrestricted stream makes.
  full = take(device_stream(synthetic_images(), config), 1)[0]
  np.testing.assert_array_equal(first["local_views"][0], full["local_views"][0])
  np.testing.assert_array_equal(first["views"][1], full["views"][1])


def test_device_augmentation_is_refused_where_it_cannot_run(tmp_path):
  config = tiny_config(**{"data.augment_on": "device", "aug.downscale": "area"})
  with pytest.raises(UserError, match="area"):
    config_checks.validate_config(config)
  with pytest.raises(UserError, match="larger than"):
    device_stream(synthetic_images(n=10))


EIGHT = """
import sys, numpy as np, jax
sys.path.insert(0, {root!r})
from conftest import tiny_config
from input_pipeline import pipeline, streams
from vit_accel import sharding
c = tiny_config(**{{"data.augment_on": "device"}})
images = np.random.default_rng(0).integers(0, 256, (96, 32, 32, 1), dtype=np.uint8)
mesh = sharding.make_mesh(c)
s = streams.global_batches(images, c, pipeline.HostShard(0, 1, 16), mesh, 2)
b = next(s)
assert len(b["views"][0].sharding.device_set) == jax.device_count() == 8
np.savez({out!r}, v0=np.asarray(b["views"][0]), v1=np.asarray(b["views"][1]))
"""


def test_eight_devices_make_the_same_batch_as_one(tmp_path):
  out = str(tmp_path / "eight.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", EIGHT.format(root=os.path.join(ROOT, "tests"),
                                                            out=out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = take(device_stream(synthetic_images(), start_step=2), 1)[0]
  eight = np.load(out)
  np.testing.assert_array_equal(eight["v0"], one["views"][0])
  np.testing.assert_array_equal(eight["v1"], one["views"][1])


NO_TENSORFLOW = "import sys, runpy; sys.modules['tensorflow'] = None; sys.argv = {argv!r}; " \
                "runpy.run_path('main.py', run_name='__main__')"


def test_device_views_train_without_tensorflow_and_the_host_path_says_it_needs_it(
    tmp_path, needs_fashion_mnist):
  """A machine without TensorFlow (TF blocked in sys.modules): the smoke recipe trains and
  evaluates on device views; the host path exits with one error line before compiling."""
  def main(*flags):
    argv = ["main.py", "--config=configs/fmnist_mocov3.py:smoke", "--config.tensorboard=False",
            "--config.budget=2500", *flags]
    return subprocess.run([sys.executable, "-c", NO_TENSORFLOW.format(argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  run = tmp_path / "device"
  proc = main(f"--workdir={run}", "--config.data.augment_on=device")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final kNN top-1" in proc.stdout
  losses = [json.loads(line).get("loss") for line in open(run / "metrics.jsonl")]
  assert [x for x in losses if x is not None] and all(np.isfinite(x) for x in losses if x)
  proc = main(f"--workdir={tmp_path / 'host'}")
  assert proc.returncode != 0 and "compiled" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "augment_on=device" in errors[0], proc.stderr[-2000:]
  assert not (tmp_path / "host").exists() or not any((tmp_path / "host").iterdir())
