"""Device mesh, shardings, and host-local -> global arrays.

The mesh has axes ('data', 'fsdp'), both `AxisType.Auto` so ordinary model code runs under jit and the
compiler inserts collectives (jax.make_mesh now defaults to Explicit axes). The batch is split over
both axes; parameters are replicated in this version (FSDP rules come with the scale-out work).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vit_accel.errors import UserError

BATCH_AXES = ("data", "fsdp")


def make_mesh(config) -> jax.sharding.Mesh:
  n = jax.device_count()
  data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
  if data == -1 and fsdp == -1:
    raise UserError("mesh.data and mesh.fsdp are both -1; set at most one of them to -1")
  if data == -1:
    data = n // max(fsdp, 1)
  if fsdp == -1:
    fsdp = n // max(data, 1)
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise UserError(f"mesh.data x mesh.fsdp = {data} x {fsdp} does not match the {n} devices; "
                    f"set one of them to -1 to use the rest")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch: int, mesh, what: str = "batch_size") -> None:
  if global_batch % mesh.size:
    raise UserError(f"{what}={global_batch} is not divisible by the {mesh.size} devices; "
                    f"use a multiple of {mesh.size}")


def host_to_global(tree, mesh):
  """Process-local batch (numpy, leading dim = local batch) -> global jax.Arrays sharded over the
  batch axes. Each process contributes its own rows."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as a full numpy array on every process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
