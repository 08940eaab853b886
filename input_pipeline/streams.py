"""The training stream as the step consumes it: global batches, sharded over the mesh's batch axes.

`global_batches` is the one entry point of the trainer, the gradient-error measurements and the
online scheduler. Where the views are made is `data.augment_on`:
  'host'    tf.data on the host CPUs (pipeline.train_dataset: every source, JPEGs decoded crop window
            only), each process's local batch then placed on its devices (sharding.host_to_global).
  'device'  the views are made on the accelerator (device_views, jitted, sharded like the batch).
            In-memory sources: the uint8 training images are held once on every device, so the
            host only computes indices (DeviceStream; no TensorFlow needed). File sources (image
            folders, TFDS): the host draws every view's crop box and decodes the one window of
            the image holding them (views.make_windows, tf.data), the device crops, resizes and
            colours (device_views.views_from_windows): decoding is all the host does, so a host
            whose cores cannot resize and colour as fast as the accelerator trains still keeps up.
Both replay the same stream on resume (a position's views depend on (seed, position, host) only);
host and device views are different draws of the same distributions (tests/test_device_views.py;
from windows, the crop boxes are the host's own draws).
"""
from __future__ import annotations

import jax
import numpy as np

from input_pipeline import device_views, sources
from vit_accel import rng_streams
from vit_accel import sharding as sharding_lib
from vit_accel.errors import UserError


def global_batches(source, config, shard, mesh, start_step: int = 0, local_crops_by_step=None):
  """An endless iterator of the training batches from `start_step` on, as global jax.Arrays.

  Args:
    source: the training source (sources.load / pipeline.load_source).
    config: the run's config (seed, model.image_size, aug, data.augment_on, data.prefetch).
    shard: this process's pipeline.HostShard.
    mesh: the run's mesh; the batches are sharded over its batch axes (sharding.batch_sharding).
    start_step: the first step to produce (resume).
    local_crops_by_step: see pipeline.train_dataset.
  Returns:
    iterator of {'views': (2 x uint8 [B, S, S, 3])} (+ 'local_views' for multi-crop recipes),
    B = the global batch.
  Raises:
    UserError: as pipeline.train_dataset.
  """
  source = sources.as_source(source)
  on_device = config.data.augment_on == "device"
  if on_device and isinstance(source, sources.InMemory):
    return DeviceStream(source, config, shard, mesh, start_step, local_crops_by_step)
  from input_pipeline import pipeline  # TensorFlow: only the host path needs it
  windows = int(config.data.window_size) if on_device else 0
  batches = pipeline.train_dataset(source, config, shard, start_step, windows=windows,
                                   local_crops_by_step=local_crops_by_step).as_numpy_iterator()
  global_batches_ = (sharding_lib.host_to_global(batch, mesh) for batch in batches)
  if not windows:
    return global_batches_
  views = _window_views(config, sharding_lib.batch_sharding(mesh))
  return (views(b["window"], b["boxes"], b["position"], b["host"], b["local_used"])
          for b in global_batches_)


def _window_views(config, rows):
  """The jitted device half of views from windows (device_views.views_from_windows), one per
  (config, sharding) in a process: (windows, boxes, positions, hosts, local crops used), as
  pipeline.train_dataset(windows=...) yields them, globally -> make_views' dict, sharded as
  `rows`."""
  seed, size, aug = int(config.seed), int(config.model.image_size), config.aug
  key = ("windows", seed, size, aug.to_json(), rows)
  if key not in _VIEW_FNS:
    def views(windows, boxes, positions, hosts, local_used):
      keys = device_views.view_keys(seed, positions, hosts)
      return device_views.views_from_windows(windows, boxes, keys, size, aug, local_used)
    _VIEW_FNS[key] = jax.jit(views, out_shardings=rows)
  return _VIEW_FNS[key]


# Reused by every stream of a process (the trainer's, each gradient-error or online measurement's):
# the table is uploaded, and the view function compiled, once. Keyed by the array's id, kept
# alive by holding the array itself.
_TABLES: dict = {}
_VIEW_FNS: dict = {}


def _placed_table(images: np.ndarray, mesh) -> jax.Array:
  """uint8 [N, H, W, C] training images, replicated on every device of `mesh` (once per array)."""
  key = (id(images), mesh)
  if key not in _TABLES:
    if len(_TABLES) >= 2:   # a new source or mesh: drop the old tables' device memory
      _TABLES.clear()
    _TABLES[key] = (images, jax.device_put(images, sharding_lib.replicated(mesh)))
  return _TABLES[key][1]


def _compiled_views(config, batch: int, crops_by_step: bool, table: jax.Array, rows):
  """The views of a global batch, compiled ahead of the loop (the first step's input wait is then
  not a compilation): (table, int32 [B] indices, uint32 [B, 2] positions, int32 [B] hosts, int32
  local crops used) -> make_views' dict, sharded as `rows`."""
  seed, size, aug = int(config.seed), int(config.model.image_size), config.aug
  key = (seed, size, aug.to_json(), batch, crops_by_step, table.shape, rows)
  if key not in _VIEW_FNS:
    def views(images, indices, positions, hosts, local_used):
      keys = device_views.view_keys(seed, positions, hosts)
      return device_views.make_views(images[indices], keys, size, aug,
                                     local_used if crops_by_step else None)
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)  # noqa: E731
    _VIEW_FNS[key] = jax.jit(views, out_shardings=rows).lower(
        table, arg((batch,), np.int32), arg((batch, 2), np.uint32), arg((batch,), np.int32),
        np.int32(0)).compile()
  return _VIEW_FNS[key]


class DeviceStream:
  """data.augment_on='device': the training images on every device, the views made there.

  The order is pipeline.train_dataset's scheme: each process reads its contiguous shard of the
  training set, in a permutation per (seed, epoch, process) (NumPy's, so not the host path's
  order), `shard.local_batch` examples per step, the epoch's remainder dropped; an example's views
  are drawn from (seed, its position in its process's stream, process). Each process computes its
  own rows' indices and keys; the jitted view function then runs where the batch's rows live.
  """

  def __init__(self, source: sources.InMemory, config, shard, mesh, start_step: int,
               local_crops_by_step=None):
    if shard.global_batch % shard.process_count:
      raise UserError(f"batch_size={shard.global_batch} is not divisible by the "
                      f"{shard.process_count} processes; pick a multiple of {shard.process_count}")
    self._shard, self._mesh = shard, mesh
    self._seed = int(config.seed)
    self._start, end = shard.shard_bounds(source.num_examples)
    self._per_epoch = ((end - self._start) // shard.local_batch) * shard.local_batch
    if self._per_epoch == 0:
      raise UserError(f"batch_size={shard.global_batch} is larger than the "
                      f"{source.num_examples} training images; lower batch_size")
    self._shard_size = end - self._start
    self._step = start_step
    self._crops = tuple(local_crops_by_step or ())
    self._epoch_cache: tuple[int, np.ndarray] | None = None
    self._rows = sharding_lib.batch_sharding(mesh)
    self._images = _placed_table(source.images, mesh)
    self._views = _compiled_views(config, shard.global_batch, bool(self._crops), self._images,
                                  self._rows)

  def __iter__(self):
    return self

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      rng = np.random.default_rng(
          [self._seed, epoch * rng_streams.EPOCH_HOST_STRIDE + self._shard.process_index])
      order = rng.permutation(self._shard_size)[:self._per_epoch] + self._start
      self._epoch_cache = (epoch, order.astype(np.int32))
    return self._epoch_cache[1]

  def _local_crops(self, step: int) -> int:
    for end, n in self._crops:
      if step < end:
        return int(n)
    return int(self._crops[-1][1]) if self._crops else 0

  def local_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 indices into the training images, int64 stream positions) of this process's rows
    of `step`'s batch, [shard.local_batch] each."""
    b = self._shard.local_batch
    positions = step * b + np.arange(b, dtype=np.int64)
    epoch, offset = divmod(int(positions[0]), self._per_epoch)
    return self._epoch_order(epoch)[offset:offset + b], positions  # per_epoch: a multiple of b

  def __next__(self) -> dict:
    indices, positions = self.local_rows(self._step)
    local = lambda x: jax.make_array_from_process_local_data(self._rows, x)  # noqa: E731
    batch = self._views(self._images, local(indices),
                        local(device_views.split_positions(positions)),
                        local(np.full(len(indices), self._shard.process_index, np.int32)),
                        np.int32(self._local_crops(self._step)))
    self._step += 1
    return batch
