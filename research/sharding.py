"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimiser state sharded along `embed`), `tensor` (Megatron-style: heads, MLP width
and vocabulary split). The batch is split over data × fsdp. A (1, 1, 1) mesh is a
single device; (n, 1, 1) plain data parallel; any product of devices otherwise.
"""
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or axes). Parameters use the short names; activations the
# `act_` names, so that the embed dimension of a weight can be fsdp-sharded while the
# same dimension of an activation (whose batch already uses fsdp) is not.
LOGICAL_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('norm', None),
    ('layers', None),
)


class MeshError(ValueError):
  pass


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (the classic in_shardings style)."""
  shape = tuple(int(s) for s in shape)
  devices = jax.devices() if devices is None else devices
  if len(shape) != 3 or min(shape) < 1:
    raise MeshError(f'mesh shape {shape}: expected three positive sizes (data, fsdp, tensor)')
  if int(np.prod(shape)) != len(devices):
    raise MeshError(f'mesh shape {shape} needs {int(np.prod(shape))} devices, '
                    f'{len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def check_divisible(mesh: Mesh, global_batch: int, abstract_params, logical_specs):
  """Fail before compiling when the mesh does not divide the batch or a parameter."""
  data = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % data:
    raise MeshError(f'batch size {global_batch} is not divisible by data×fsdp = {data} '
                    f'of mesh {dict(mesh.shape)}')
  rules = dict(LOGICAL_RULES)
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(flat_params, flat_specs):
    for dim, name in zip(leaf.shape, tuple(spec)):
      axes = rules.get(name)
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if dim % size:
        raise MeshError(f'parameter {jax.tree_util.keystr(path)} dimension {name}={dim} is '
                        f'not divisible by mesh axes {axes} of size {size}')


def logical_to_sharding(logical_specs, mesh: Mesh):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def global_batch(batch, mesh: Mesh, rows: int = 0):
  """A batch as global arrays split over data×fsdp: on one process the arrays as they
  are (jit places them), on several each process's rows become its part of the global
  batch (`jax.make_array_from_process_local_data`), so every step and evaluation sees
  the same global batch on any number of processes. `rows` > 0: the global batch must
  have that many rows (MeshError otherwise: e.g. every process fed the whole batch
  instead of its `process_rows`, which duplicates each row once per process)."""
  if jax.process_count() > 1:
    where = batch_sharding(mesh)
    batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(where, x), batch)
  if rows:
    for x in jax.tree.leaves(batch):
      if x.shape[0] != rows:
        raise MeshError(f'the global batch has {x.shape[0]} rows, not {rows}: each of the '
                        f'{jax.process_count()} processes must feed only its rows '
                        '(sharding.process_rows)')
  return batch


def process_rows(mesh: Mesh, global_rows: int) -> slice:
  """The rows [start, stop) of a `global_rows`-row batch that this process feeds to
  `global_batch` (under `batch_sharding`, the rows its devices hold): the whole batch
  on one process, a contiguous 1/process_count share on several (mesh devices in
  process order, as `make_mesh` lays them out). Raises MeshError when the batch does
  not split evenly or this process's rows are not one contiguous block."""
  if jax.process_count() == 1:
    return slice(0, global_rows)
  data = mesh.shape['data'] * mesh.shape['fsdp']
  if global_rows % data:
    raise MeshError(f'batch size {global_rows} is not divisible by data×fsdp = {data} '
                    f'of mesh {dict(mesh.shape)}')
  spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                  for s in batch_sharding(mesh).addressable_devices_indices_map(
                      (global_rows,)).values()})
  start, stop = spans[0]
  for a, b in spans[1:]:
    if a != stop:
      raise MeshError(f'process {jax.process_index()} holds rows {spans} of the batch: not '
                      'one contiguous block (order the mesh devices by process)')
    stop = b
  return slice(start, stop)


def host_local(tree):
  """Every leaf as a numpy array holding the whole (global) value, on every process:
  `np.asarray` where a process can read it all, else gathered from all processes
  (`multihost_utils.process_allgather`, a collective every process must call)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def place(tree, shardings):
  """`tree` (host or single-device arrays holding the whole value, the same on every
  process; typed PRNG keys allowed) put in `shardings` (a matching tree or one
  sharding): `jax.device_put` on one process, on several each process builds its
  addressable shards (`jax.make_array_from_callback`)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  # Several processes: jax.device_put refuses shardings over other processes' devices.
  if not isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda x, s: s, tree, shardings)
  else:
    shardings = jax.tree.map(lambda x: shardings, tree)

  def one(x, where):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x), where),
                                      impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, where, lambda index: value[index])
  return jax.tree.map(one, tree, shardings)
