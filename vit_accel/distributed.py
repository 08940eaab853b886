"""Starting the multi-process (multi-host) JAX runtime, before anything touches a device.

One process per host (TPU VM worker, GPU node), all running the same command. Which processes form the
cluster comes, first match wins, from
  1. config.distributed.coordinator_address / num_processes / process_id (flags or recipe),
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  3. JAX's own cluster detection (Cloud TPU pods, Slurm, Open MPI): jax.distributed.initialize()
     without arguments, when `distributed.initialize` is 'always', or 'auto' and such an environment
     is detected.
`distributed.initialize`: 'auto' (default: start when 1 or 2 gives an address, or a multi-process
Slurm / Open MPI / TPU-pod environment is seen), 'always', 'never' (single process).
"""
from __future__ import annotations

import os

import jax
from absl import logging

from vit_accel.errors import UserError

MODES = ("auto", "always", "never")


def _multi_process_environment() -> bool:
  """A launcher that runs one process per host and that JAX can read by itself."""
  def count(name):
    try:
      return int(os.environ.get(name, "1"))
    except ValueError:
      return 1
  tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1 or len(tpu_hosts) > 1


def cluster_arguments(config) -> dict | None:
  """The arguments for jax.distributed.initialize, or None when this is a single-process run."""
  d = config.distributed
  mode = d.initialize
  if mode not in MODES:
    raise UserError(f"distributed.initialize={mode!r}; use one of {', '.join(MODES)}")
  if mode == "never":
    return None
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num = int(d.num_processes)
  pid = int(d.process_id)
  try:
    num = num if num > 0 else int(os.environ.get("JAX_NUM_PROCESSES", -1))
    pid = pid if pid >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
  except ValueError as e:
    raise UserError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers ({e})") from None
  timeout = int(d.timeout_s)
  if address:
    if num <= 0 or not 0 <= pid < num:
      raise UserError(f"distributed.coordinator_address={address!r} needs distributed.num_processes "
                      f"> 0 and 0 <= distributed.process_id < num_processes (got {num}, {pid}); "
                      f"or set JAX_NUM_PROCESSES / JAX_PROCESS_ID")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid,
            "initialization_timeout": timeout}
  if mode == "always" or _multi_process_environment():
    return {"initialization_timeout": timeout}   # JAX detects TPU pod / Slurm / Open MPI
  return None


def initialize(config) -> None:
  """Start the cluster if this run is multi-process (see the module doc); idempotent."""
  args = cluster_arguments(config)
  if args is None or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(**args)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in args.items())}) "
                    f"failed: {first}") from None
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
