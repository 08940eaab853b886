"""What each compression strategy saves, measured side by side on this machine, as a markdown table.

  python bench/compression_cost.py [--config=configs/fmnist_mocov3.py] [--out=bench/results/...md]

Runs `--mode=cost`'s measurement (train step compiled per strategy, median of repeated timings after
warm-up, synthetic uint8 batch, no input pipeline) and adds the full-length feature-extraction rate
(what a kNN pass costs). Ratios, not absolute times, are the result: they come from one process.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vit_accel import cost_table, io, state, train_step  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/fmnist_mocov3.py", "recipe")
flags.DEFINE_string("out", "", "markdown file to write (default: print only)")
FLAGS = flags.FLAGS


def feature_rate(config, batches: int = 3) -> float:
  """Images/s of full-length backbone features at eval.batch_size (a kNN pass)."""
  model = state.build_model(config)
  s = config.model.image_size
  params = model.init(jax.random.key(0), np.zeros((2, s, s, 3), np.float32))["params"]
  fn = jax.jit(lambda p, im: model.apply({"params": p}, train_step.normalize_images(im, config),
                                         method="features"))
  x = np.random.default_rng(0).integers(0, 256, (config.eval.batch_size, s, s, 3), np.uint8)
  jax.block_until_ready(fn(params, x))
  times = []
  for _ in range(batches):
    t = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    times.append(time.perf_counter() - t)
  return config.eval.batch_size / statistics.median(times)


def main(_):
  config = FLAGS.config
  rows = cost_table.measure(config)
  m = config.model
  args = " ".join(sys.argv[1:])
  lines = [
      "# Compression cost: measured vs analytic speed-up of the train step", "",
      f"Machine: {cost_table.machine_description()}.", "",
      f"Command: `python bench/compression_cost.py{' ' + args if args else ''}` (the same "
      "measurement as `python main.py --config=configs/fmnist_mocov3.py --mode=cost`).", "",
      f"Model: ViT width {m.width}, depth {m.depth}, {m.num_heads} heads, base patch {m.patch_size} "
      f"on {m.image_size} px; {config.objective} {config[config.objective].to_dict()}, global batch "
      f"{config.batch_size}; train step compiled per strategy, median of "
      f"{max(5, config.compression.cost_repeats)} timed steps after 2 warm-up steps, synthetic "
      f"batch (no tf.data).", "",
      "`units` = analytic per-sample step cost in base-forward units (1 = one uncompressed backbone "
      "forward; a gradient branch costs ~3 forwards, a key branch 1; heads included). "
      "`ratio` = measured / analytic speed-up.", "",
      "| strategy | tokens q/k | units | ms/step | measured speed-up | analytic "
      "speed-up | ratio | compile s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| `{r['strategy'].replace('|', chr(92) + '|')}` | {r['seq_len']}/{r['key_seq_len']} | "
                 f"{r['analytic_units']:.2f} | {r['ms_per_step']:.0f} | "
                 f"{r['measured_speedup']:.2f}x | {r['analytic_speedup']:.2f}x | "
                 f"{r['efficiency']:.2f} | {r['compile_s']:.1f} |")
  rate = feature_rate(config)
  lines += ["", f"Full-length feature extraction (a kNN pass): {rate:.0f} images/s at batch "
            f"{config.eval.batch_size}."]
  text = "\n".join(lines) + "\n"
  print(text)
  if FLAGS.out:
    io.atomic_write_text(FLAGS.out, text)


if __name__ == "__main__":
  app.run(main)
