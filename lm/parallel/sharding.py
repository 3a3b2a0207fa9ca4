"""The device mesh and the mapping of logical axis names onto it.

Data, FSDP and tensor parallelism are only mesh shapes plus the rules table in
`config.mesh.rules`; model code only names axes.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm import config as config_lib

BATCH_AXES = ('data', 'fsdp')


def make_mesh(shape: tuple[int, ...], devices=None) -> Mesh:
  """A mesh over MESH_AXES. Built with `Mesh` (Auto axes): Flax's logical constraints fail
  on the Explicit axes that `jax.make_mesh` now gives by default."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(shape), config_lib.MESH_AXES)


def rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.mesh.rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sequences split over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold: what it must read. Rows
  are replicated over the tensor and stage axes, so processes may share them."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
  rows = sorted({i for (s,) in indices for i in range(*s.indices(batch_size))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise config_lib.ConfigError(
        f'process {jax.process_index()} holds rows {rows} of the batch of {batch_size}, not a '
        'contiguous block; order config.mesh.shape so that data and fsdp split across hosts')
  return slice(rows[0], rows[-1] + 1)


def with_mesh(fn, mesh: Mesh, axis_rules):
  """fn called (and so traced) with the mesh and logical-axis rules active, which
  nn.with_logical_constraint needs; `jax.set_mesh` may not be entered inside a jit."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      return fn(*args, **kwargs)
  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def params_shardings(boxed_params, mesh: Mesh, axis_rules):
  """NamedShardings for parameters that carry logical axis metadata (abstract or real)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, axis_rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, abstract_params,
                        param_shardings, mesh: Mesh):
  """Optimizer-state leaves shaped like their parameter are sharded like it; the rest
  (counts, Adafactor's factored statistics) are replicated."""
  return optax.tree_map_params(
      tx, lambda leaf, param, sharding: sharding if leaf.shape == param.shape else replicated(mesh),
      abstract_opt_state, abstract_params, param_shardings,
      transform_non_params=lambda _: replicated(mesh))
