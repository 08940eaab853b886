"""Device mesh, shardings, and host-local -> global arrays.

The mesh has axes ('data', 'fsdp'), both `AxisType.Auto` so ordinary model code runs under jit and the
compiler inserts collectives (jax.make_mesh now defaults to Explicit axes). The batch is split over
both axes. Train-state leaves (parameters, EMA copies, optimiser moments) follow a small rule table:
with `mesh.fsdp` > 1 a large leaf is split over 'fsdp' on its largest divisible dimension (ZeRO-3 /
FSDP: the compiler all-gathers it where a matmul needs it); everything else is replicated.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

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


# (pattern on the leaf's path, rule), first match wins. Paths look like ".params['backbone']
# ['block0']['mlp']['fc1']['kernel']" (jax.tree_util.keystr).
FSDP_RULES = (
    (r"cls_token|pos_embed|\['center'\]", "replicate"),   # small, read whole by every token
    (r".*", "largest_divisible"),
)
# Leaves below this many elements stay replicated (biases, norms, counters): sharding them saves
# nothing and costs a collective each.
FSDP_MIN_SIZE = 2 ** 14


def leaf_spec(path: str, shape, fsdp: int) -> P:
  """The PartitionSpec of one state leaf under FSDP_RULES."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for pattern, rule in FSDP_RULES:
    if re.search(pattern, path):
      if rule == "replicate":
        return P()
      dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % fsdp == 0]
      if not dims:
        return P()
      spec = [None] * len(shape)
      spec[dims[0]] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh):
  """NamedShardings for every leaf of a (abstract) train state, from the rule table."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, leaf_spec(jax.tree_util.keystr(path), x.shape, fsdp)),
      abstract_state)


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
