"""The cost table: what each compression strategy really saves on this machine.

For the full-length step and every candidate in `compression.cost_candidates`, compile the train step
ahead of time, time it (median of `compression.cost_repeats` runs after two warm-up runs, synthetic
uint8 batch, no input pipeline, so no TensorFlow), and compare with the analytic cost model
(step_plan.step_cost_units). --mode=cost (vit_accel/modes/cost.py) writes the rows to
WORKDIR/cost_table.json and prints them as a table; bench/compression_cost.py as markdown.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import numpy as np

from vit_accel import compression, run_setup, step_plan, train_step
from vit_accel import sharding as sharding_lib


def machine_description() -> str:
  """One line: CPU architecture and count, devices, JAX version."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.device_count()} x {kind} "
          f"({dev.platform}), jax {jax.__version__}")


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program by XLA's cost analysis (None where not reported)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def measure(config, on_row=None) -> list[dict]:
  """One row per candidate (full length first); `on_row(row)` sees each as soon as it is measured.
  Builds the run without data (run_setup.build(splits=())): synthetic batches, no TensorFlow."""
  setup = run_setup.build(config, splits=())
  mesh = setup.mesh
  batch_sharding = sharding_lib.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  batch = {name: tuple(jax.device_put(rng.integers(0, 256, shape, np.uint8), batch_sharding)
                       for shape in shapes)
           for name, shapes in train_step.batch_shapes(config).items()}
  progress = jax.device_put(np.float32(0.5), sharding_lib.replicated(mesh))
  repeats = max(5, int(config.compression.cost_repeats))

  rows = []
  for strategies in step_plan.candidates(config, "compression.cost_candidates"):
    compiled, compile_s = train_step.compile_train_step(config, setup.model, setup.tx, strategies,
                                                        mesh, setup.abstract_state,
                                                        setup.state_shardings)
    flops = compiled_flops(compiled)
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(jax.random.key(0))
    for _ in range(2):
      state, metrics = compiled(state, batch, progress)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch, progress)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    q, k = strategies.layouts(config.model.image_size, config.model.patch_size)
    units = step_plan.step_cost_units(config, strategies)
    row = {"strategy": strategies.spec, "query": strategies.query.spec,
           "key": strategies.key.spec, "seq_len": q.seq_len, "key_seq_len": k.seq_len,
           "analytic_units": units,
           # Per step: units x FLOPs of one base forward x batch (the cost model, 2 per mul-add).
           "analytic_flops": (units * compression.base_forward_flops(config.model)
                              * config.batch_size),
           "ms_per_step": 1000.0 * statistics.median(times),
           "compile_s": compile_s, "xla_flops": flops}
    full = rows[0] if rows else row
    row["measured_speedup"] = full["ms_per_step"] / row["ms_per_step"]
    row["analytic_speedup"] = full["analytic_units"] / row["analytic_units"]
    row["efficiency"] = row["measured_speedup"] / row["analytic_speedup"]
    rows.append(row)
    if on_row is not None:
      on_row(row)
    del state
  return rows


def format_table(rows: list[dict]) -> str:
  """The rows as printed text, one line per strategy."""
  head = (f"{'strategy':<24} {'seq':>4} {'key':>4} {'units':>7} {'ms/step':>9} "
          f"{'speed-up':>9} {'analytic':>9} {'ratio':>6} {'compile':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['strategy']:<24} {r['seq_len']:>4} {r['key_seq_len']:>4} "
                 f"{r['analytic_units']:>7.2f} {r['ms_per_step']:>9.1f} "
                 f"{r['measured_speedup']:>8.2f}x {r['analytic_speedup']:>8.2f}x "
                 f"{r['efficiency']:>6.2f} {r['compile_s']:>7.1f}s")
  return "\n".join(lines)
