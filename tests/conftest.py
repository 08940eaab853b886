import os

import pytest

# Keep test processes quiet and on the CPU, whatever the machine has.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compile cache for the test session and both tiers: the in-process runs and the
# main.py subprocesses (they inherit the environment; a config's compile_cache_dir="" then falls
# back to it) compile the same tiny models again and again. It changes no result: the cache key
# holds the JAX version, XLA flags and devices, and a hit is the executable XLA would compile. In
# the user's own cache directory (JAX runs what it finds there: no shared /tmp), capped; delete it
# between sessions if JAX warns that it cannot read an entry (a process killed mid-write).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "vit_accel", "test_xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# Tests import tensorflow themselves; TF must be configured (accelerators hidden) before any of
# them runs an op, as the pipeline does at its first use.
from input_pipeline import tf_runtime  # noqa: E402

tf_runtime.load()

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def budget_for_steps(config, steps: int, spec: str = "full|full") -> float:
  """Budget (units) that buys `steps` steps of one strategy (plus half a step: the plan floors)."""
  from vit_accel import step_plan
  from vit_accel.compression import BranchStrategies
  per_step = step_plan.step_cost_units(config, BranchStrategies.parse(spec)) * config.batch_size
  return (steps + 0.5) * per_step


def tiny_config(steps: int = 6, schedule: str = "none", recipe: str = "mocov3", **overrides):
  """The smoke recipe `recipe` (configs/fmnist_<recipe>.py) shrunk further: `steps`
  uncompressed steps of a 2-layer ViT (or `schedule` with the same budget), kNN on small subsets."""
  import importlib
  c = importlib.import_module(f"configs.fmnist_{recipe}").get_config("smoke")
  c.batch_size = 16
  c.schedule = schedule
  c.compile_cache_dir = ""
  c.log_every_steps = 2
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = True
  c.tensorboard = False
  c.eval.bank_size = 100
  c.eval.query_size = 200
  c.eval.batch_size = 200
  c.eval.final_bank_size = 400
  c.eval.final_query_size = 200
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  if c.budget <= 0:
    c.budget = budget_for_steps(c, steps)
  return c


@pytest.fixture
def needs_fashion_mnist():
  if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
    pytest.fail("Fashion-MNIST is not installed: run ./setup.sh (apt-get install dataset-fashion-mnist)")
