"""Data parallelism: choosing a mode, the device mesh, placing the state and the batch, and
starting JAX's multi-process runtime.

Modes (see `mprnet_jax.train_step`): 'mesh' (jit over a 1-D mesh whose axis 'data' splits the
batch; one process or many), 'none' (the same on a mesh of one device), and 'pmap' (classic
`jax.pmap`, one process: the one special case).

Several processes (TPU pods, GPU clusters): call `initialize_distributed()` first thing; each
process then loads its own slice of the data (batch_size / process_count examples) and
`place_batch` assembles the global batch from the slices.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mprnet_jax.errors import ConfigError

__all__ = [
    'choose_parallel', 'initialize_distributed', 'is_main_process', 'make_mesh', 'one_device_mesh',
    'place_batch', 'place_state', 'unplace_state'
]

DATA_AXIS = 'data'


def choose_parallel(mode: str = 'auto') -> str:
  """'auto' -> 'mesh' with several devices, else 'none'; 'none' / 'mesh' / 'pmap' unchanged."""
  if mode == 'auto':
    return 'mesh' if jax.device_count() > 1 else 'none'
  if mode not in ('none', 'mesh', 'pmap'):
    raise ConfigError(f"parallel mode must be 'auto', 'none', 'mesh' or 'pmap', got {mode!r}")
  if mode == 'pmap' and jax.process_count() > 1:
    raise ConfigError("parallel='pmap' is single-process here; use 'mesh' across processes")
  return mode


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes).

  Auto axis type: XLA propagates the batch sharding through the network and inserts the
  gradient all-reduce itself.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def one_device_mesh() -> Mesh:
  """The mesh of 'none': this process's first device."""
  return make_mesh(jax.local_devices()[:1])


def _local_mesh() -> Mesh:
  return make_mesh(jax.local_devices())


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _replicate_global(x, sharding: NamedSharding):
  """A replicated global array from a value that every process holds identically."""
  if _is_key(x):
    return jax.random.wrap_key_data(_replicate_global(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def place_state(state, parallel: str, mesh: Mesh | None = None):
  """The state ready for the train step of `parallel`.

  'none' and 'mesh': replicated over the mesh (`P()`; 'none' uses the mesh of one device); with
  several processes every process must pass the same values. 'pmap': one copy per local
  device, stacked on a leading axis.
  """
  if parallel == 'pmap':
    devices = jax.local_device_count()
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (devices,) + x.shape), state)
    return jax.device_put(stacked, NamedSharding(_local_mesh(), P(DATA_AXIS)))
  sharding = NamedSharding(_mesh_of(parallel, mesh), P())
  if jax.process_count() == 1 or parallel == 'none':
    return jax.device_put(state, sharding)
  return jax.tree.map(lambda x: _replicate_global(x, sharding), state)


def _mesh_of(parallel: str, mesh: Mesh | None) -> Mesh:
  if parallel == 'none':
    return one_device_mesh()
  if parallel != 'mesh':
    raise ConfigError(f"parallel mode must be 'none', 'mesh' or 'pmap', got {parallel!r}")
  if mesh is None:
    raise ValueError("parallel='mesh' needs a mesh (make_mesh())")
  return mesh


def unplace_state(state, parallel: str):
  """A one-device view of a placed state (for evaluation on one device, checkpoints of the
  unreplicated values, or inspection): each leaf as a single-device array on this process's
  first device. With 'mesh' every process gets the same values.
  """
  if parallel == 'pmap':
    return jax.tree.map(lambda x: x.addressable_data(0)[0], state)
  if parallel not in ('none', 'mesh'):
    raise ValueError(f'unknown parallel mode {parallel!r}')
  return jax.tree.map(lambda x: x.addressable_data(0), state)


def _check_divisible(batch_size: int, devices: int, what: str) -> None:
  if batch_size % devices:
    raise ConfigError(
        f'the per-process batch of {batch_size} examples does not divide over the {devices} '
        f'{what}; choose batch_size as a multiple of {jax.device_count()} (all devices)')


def place_batch(local_batch, parallel: str, mesh: Mesh | None = None):
  """This process's batch slice (a pytree of (B_local, ...) numpy arrays) -> the global batch.

  'mesh': one global array of B_local * process_count examples, split on the mesh's 'data'
  axis (process p's slice lands on p's devices); 'none': the same on the mesh of one device.
  'pmap': reshaped to (local devices, B_local / local devices, ...) and spread over them.
  """
  leaves = jax.tree.leaves(local_batch)
  if not leaves:
    raise ValueError('empty batch')
  batch_size = leaves[0].shape[0]
  if parallel == 'pmap':
    devices = jax.local_device_count()
    _check_divisible(batch_size, devices, 'local devices')
    sharding = NamedSharding(_local_mesh(), P(DATA_AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(
            np.asarray(x).reshape((devices, batch_size // devices) + x.shape[1:]), sharding),
        local_batch)
  mesh = _mesh_of(parallel, mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  _check_divisible(batch_size, local_devices, 'devices of this process in the mesh')
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def _launched_as_several_processes() -> bool:
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env:
    return True
  if int(env.get('JAX_NUM_PROCESSES', '1') or 1) > 1:
    return True
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_JOB_ID' in env:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return True
  # Multi-host Cloud TPU slices list every worker; a single host lists one (or none).
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or 'MEGASCALE_COORDINATOR_ADDRESS' in env:
    return True
  return False


def initialize_distributed(**kwargs) -> bool:
  """Starts JAX's multi-process runtime when this program runs as one of several processes.

  Several processes are recognised from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, SLURM (SLURM_NTASKS > 1), Open MPI, or a multi-host TPU slice; explicit
  `kwargs` (those of `jax.distributed.initialize`) always initialise. Otherwise a no-op.
  Call it before anything else touches JAX's devices. Returns whether it initialised.
  """
  if jax.distributed.is_initialized():
    return False
  if not kwargs and not _launched_as_several_processes():
    return False
  env = os.environ
  if 'coordinator_address' not in kwargs and 'JAX_COORDINATOR_ADDRESS' in env:
    kwargs['coordinator_address'] = env['JAX_COORDINATOR_ADDRESS']
  if 'num_processes' not in kwargs and 'JAX_NUM_PROCESSES' in env:
    kwargs['num_processes'] = int(env['JAX_NUM_PROCESSES'])
  if 'process_id' not in kwargs and 'JAX_PROCESS_ID' in env:
    kwargs['process_id'] = int(env['JAX_PROCESS_ID'])
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """True on the process that logs and writes files (process 0)."""
  return jax.process_index() == 0
