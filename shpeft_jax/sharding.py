"""The device mesh ('data' x 'fsdp') and the sharding rules of params, optimizer state and batches.

Batches are split over both axes; a parameter (and its optimizer state) is sharded FSDP-style along
its largest dimension divisible by the 'fsdp' axis, or replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from shpeft_jax.errors import ConfigError

PyTree = Any

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg) -> tuple[int, int]:
  """(data, fsdp) for `config.mesh`; raises ConfigError when it does not fit the devices."""
  n = jax.device_count()
  fsdp, data = int(mesh_cfg.fsdp), int(mesh_cfg.data)
  if fsdp <= 0 or n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must divide the {n} devices.")
  if data <= 0:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"mesh.data * mesh.fsdp = {data} * {fsdp} != {n} devices; set "
                      f"mesh.data=-1 to use all of them.")
  return data, fsdp


def validate_batch_sizes(train_cfg) -> None:
  """Every global batch must split evenly over the devices."""
  n_dev = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    b = int(train_cfg[name] or 0)
    if name == "eval_batch_size" and b == 0:
      continue
    if b <= 0 or b % n_dev:
      raise ConfigError(
          f"train.{name}={b} is not divisible by the {n_dev} devices of the mesh; use a multiple "
          f"of {n_dev} (e.g. --config.train.{name}={max(n_dev, (b // n_dev) * n_dev or n_dev)}).")


def make_mesh(mesh_cfg) -> Mesh:
  data, fsdp = mesh_shape(mesh_cfg)
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  try:
    return Mesh(devices, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  except (TypeError, AttributeError):
    return Mesh(devices, BATCH_AXES)


def param_spec(shape, fsdp: int) -> P:
  """FSDP: shard the largest dimension divisible by the fsdp axis; replicate otherwise."""
  if fsdp <= 1 or not shape:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree) -> PyTree:
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def chunk_sharding(mesh: Mesh) -> NamedSharding:
  """Stacked batches [chunk, B, ...] (the scoring pass), sharded along the batch axis."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(batch, sharding):
  """A process-local host batch -> global jax.Arrays (image, label, valid)."""
  batch = {k: batch[k] for k in ("image", "label", "valid")}
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def sync_processes(name: str) -> None:
  """A barrier over every process of a multi-process run (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
