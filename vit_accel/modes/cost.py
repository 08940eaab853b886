"""--mode=cost: the train step timed per compression strategy (cost_table.measure) ->
WORKDIR/cost_table.json (rows) and WORKDIR/cost_table_meta.json (machine, model, objective), printed
as a table. Synthetic batches: never imports TensorFlow."""
from __future__ import annotations

import os

import jax

from vit_accel import cost_table, distributed, io
from vit_accel.modes import Args, save_config


def run(config, workdir: str, args: Args = Args()) -> list[dict]:
  """The table's rows (see cost_table.measure)."""
  del args
  distributed.initialize(config)   # multi-host: before anything touches a device
  rows = cost_table.measure(config)
  m = config.model
  meta = {"machine": cost_table.machine_description(), "batch_size": int(config.batch_size),
          "model": m.to_dict(), "objective": config.objective,
          "objective_config": config[config.objective].to_dict()}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    io.atomic_write_json(os.path.join(workdir, "cost_table.json"), rows)
    io.atomic_write_json(os.path.join(workdir, "cost_table_meta.json"), meta)
    save_config(config, workdir, "cost", primary=jax.process_index() == 0)
  print(f"{meta['machine']}; batch {config.batch_size}, ViT width {m.width} depth {m.depth} "
        f"patch {m.patch_size} on {m.image_size}px, {config.objective} {meta['objective_config']}")
  print(cost_table.format_table(rows), flush=True)
  return rows
