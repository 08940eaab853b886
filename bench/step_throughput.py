"""Train-step and feature-extraction throughput of the trainer's compiled step, on synthetic data.

  python bench/step_throughput.py [--config=configs/fmnist_mocov3.py] [--config.model.patch_size=8]

Measures the step alone (no tf.data), so input-pipeline cost can be told apart from compute.
"""
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/fmnist_mocov3.py", "recipe")
flags.DEFINE_integer("steps", 5, "timed steps")
FLAGS = flags.FLAGS


def main(_):
  from vit_accel import train
  from vit_accel import sharding as sharding_lib
  config = FLAGS.config
  model = train.build_model(config)
  tx, lr_fn = train.make_optimizer(config, 1000)
  s = config.model.image_size
  rng = jax.random.key(0)
  params = model.init(rng, jnp.zeros((2, s, s, 3)))["params"]
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           key_params=jax.tree.map(jnp.copy, {k: params[k] for k in ("backbone", "projector")}),
                           opt_state=tx.init(params))
  step = jax.jit(train.make_train_step(config, model, tx, lr_fn, 1000), donate_argnums=0)
  b = config.batch_size
  x = np.random.default_rng(0).integers(0, 255, (b, s, s, 3), dtype=np.uint8)
  batch = {"views": (jnp.asarray(x), jnp.asarray(x))}
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / FLAGS.steps
  feat = jax.jit(lambda p, im: model.apply({"params": p}, train.normalize_images(im, config),
                                           method=type(model).features))
  xe = jnp.asarray(np.repeat(x, 4, axis=0)[:1000])
  jax.block_until_ready(feat(state.params, xe))
  t = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(feat(state.params, xe))
  fdt = (time.perf_counter() - t) / 3
  print(f"machine={platform.machine()} cpus={os.cpu_count()} backend={jax.default_backend()} "
        f"jax={jax.__version__}")
  print(f"patch={config.model.patch_size} width={config.model.width} depth={config.model.depth} "
        f"batch={b} symmetric={config.mocov3.symmetric}: step {dt*1000:.0f} ms = {b/dt:.0f} img/s; "
        f"features {1000/fdt:.0f} img/s")


if __name__ == "__main__":
  app.run(main)
