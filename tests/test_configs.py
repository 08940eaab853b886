"""The ImageNet recipes compile: on 8 simulated CPU devices, each config's train step for the first
and the last stage of its schedule is lowered and compiled ahead of time at the recipe's shapes (224
px, patch 16, width, heads, published head sizes and crop counts) at a tiny global batch. This catches
shape, sharding and config mistakes without ImageNet or an accelerator. The parameter count is checked
on the full recipe; the compiled network keeps 2 of its 12 blocks (identical blocks: 12 would
compile the same thing 6x slower, ~7 minutes per config on 2 cores)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AOT_PROBE = """
import jax
from configs import {module} as recipe
from vit_accel import config_checks, optimizer, sharding, state, step_plan, train_step

config = recipe.get_config({arg!r})
with config.unlocked():
  config.batch_size = 16          # 2 per device
  config.mesh.fsdp = {fsdp}
config_checks.validate_config(config)
mesh = sharding.make_mesh(config)
tx = optimizer.make_optimizer(config)
_, full, _ = state.state_layout(config, state.build_model(config), tx, mesh)
backbone = sum(x.size for x in jax.tree.leaves(full.params["backbone"]))
with config.unlocked():
  config.model.depth = 2
model = state.build_model(config)
_, abstract, shardings = state.state_layout(config, model, tx, mesh)
stages = step_plan.parse_schedule(config.schedule, config.compression.bucket, config.model)
for stage in (stages[0], stages[-1]):
  compiled, seconds = train_step.compile_train_step(config, model, tx, stage.strategies, mesh,
                                                    abstract, shardings)
  print("compiled", stage.strategies.spec, round(seconds, 1), flush=True)
sharded = [s.spec for s in jax.tree.leaves(shardings.params) if s.spec != jax.sharding.PartitionSpec()]
print("devices", mesh.size, "backbone_params", backbone, "sharded_leaves", len(sharded))
"""


@pytest.mark.slow
@pytest.mark.parametrize("module, arg, fsdp, params_m", [
    ("imagenet_mocov3_vit_b16", "", 1, 85.8),
    ("imagenet_simclr_vit_b16", "", 2, 85.8),
    ("imagenet_dino_vit_b16", "", 1, 85.8),
    ("imagenet_dino_vit_b16", "vit_s16", 2, 21.7),
])
def test_imagenet_train_steps_compile_on_8_devices(module, arg, fsdp, params_m):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", AOT_PROBE.format(module=module, arg=arg, fsdp=fsdp)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert probe.returncode == 0, probe.stderr[-3000:]
  lines = probe.stdout.splitlines()
  assert sum(line.startswith("compiled ") for line in lines) == 2, probe.stdout
  words = lines[-1].split()
  assert words[:2] == ["devices", "8"]
  assert abs(int(words[3]) / 1e6 - params_m) < 0.5, words   # ViT-B/16 ~85.8M, ViT-S/16 ~21.7M
  assert (int(words[5]) > 0) == (fsdp > 1)                   # FSDP really shards the parameters
