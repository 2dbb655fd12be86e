"""The one place where per-device train steps become data-parallel programs.

A step is written once, for one device, as
    step(state, frozen, root_key, *batch, axis_name) -> (state, metrics)
with every batch reduction a collective over `axis_name` (None: no collectives). Its state
and `frozen` inputs (teacher and generator variables that the step does not train) are
replicated; `batch` arrays, if any, are split along their first axis. `DataParallel`
wraps it for `config.parallel`:
  'none':      jax.jit on one device;
  'pmap':      jax.pmap over the devices (axis 'batch');
  'shard_map': jax.jit of jax.shard_map over a 1-D 'data' mesh of the devices.
State is kept in the wrapper's layout between steps; `to_host` brings it back to the
layout-free form that checkpoints and evaluation use.

Multi-host (several processes, e.g. a TPU pod slice): after `initialize_distributed`, the
devices are those of all processes and collectives span them all. Every process computes
the same global batch on the host and feeds its own devices' rows of it; replicated state
stays identical on every process.
"""

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ('pmap', 'shard_map', 'none')

# Set to 1 to call jax.distributed.initialize() (e.g. on every host of a TPU pod slice).
DISTRIBUTED_ENV = 'RDSKD_DISTRIBUTED'


def initialize_distributed(config) -> None:
  """Joins the multi-process run when `config.distributed` or $RDSKD_DISTRIBUTED=1 asks.

  Must run before anything touches a JAX device. On Cloud TPU (and SLURM, MPI, ...),
  `jax.distributed.initialize()` finds the coordinator and the process ids by itself;
  elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID on every process.
  """
  wanted = config.get('distributed', False) or os.environ.get(DISTRIBUTED_ENV) == '1'
  if wanted and not jax.distributed.is_initialized():
    given = {name: int(os.environ[var]) for name, var in
             (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID'))
             if var in os.environ}
    jax.distributed.initialize(**given)


def is_main_process() -> bool:
  """Whether this process writes files and prints progress (process 0 only)."""
  return jax.process_index() == 0


class DataParallel:
  """Wraps per-device steps and moves state in and out of the parallel layout.

  `num_devices` picks the first N devices (0: all); with several processes only 0 is
  accepted, because every process must take part.
  """

  def __init__(self, mode: str, num_devices: int = 0):
    if mode not in MODES:
      raise ValueError(f'unknown parallel mode {mode!r}; expected one of {", ".join(MODES)}')
    self.mode = mode
    available = jax.devices()
    if mode == 'none':
      if jax.process_count() > 1:
        raise ValueError("parallel='none' runs on one device; a multi-process run needs "
                         "'pmap' or 'shard_map'")
      num_devices = 1
    if num_devices and jax.process_count() > 1 and num_devices != len(available):
      raise ValueError(f'num_devices={num_devices} in a {jax.process_count()}-process run; '
                       'expected 0 (all devices of all processes)')
    if num_devices > len(available):
      raise ValueError(f'num_devices={num_devices}, but only {len(available)} devices exist')
    self.devices = available[:num_devices] if num_devices else available
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.num_devices = len(self.devices)
    if mode == 'shard_map':
      self.mesh = Mesh(np.asarray(self.devices), ('data',))
    self.axis_name = {'pmap': 'batch', 'shard_map': 'data', 'none': None}[mode]

  def wrap(self, step_fn, num_batch_args: int = 0):
    """The parallel program of `step_fn` (state donated; batch args split on axis 0)."""
    step_fn = functools.partial(step_fn, axis_name=self.axis_name)
    if self.mode == 'none':
      return jax.jit(step_fn, donate_argnums=0)
    if self.mode == 'pmap':
      return jax.pmap(step_fn, axis_name=self.axis_name, donate_argnums=0,
                      in_axes=(0, 0, None) + (0,) * num_batch_args,
                      devices=None if self.num_devices == jax.device_count() else self.devices)
    sharded = jax.shard_map(step_fn, mesh=self.mesh,
                            in_specs=(P(), P(), P()) + (P('data'),) * num_batch_args,
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)

  def replicate(self, tree):
    """Host or single-device pytree (the same on every process) -> replicated input of a
    wrapped step. Always a copy: wrapped steps donate their state."""
    if self.mode == 'pmap':
      # Committed arrays laid out as pmap lays out its outputs: fed host arrays, the first
      # step would compile once more on the second call (seen with JAX 0.10).
      sharding = NamedSharding(Mesh(np.asarray(self.devices), ('batch',)), P('batch'))
      n = len(self.local_devices)

      def stack(x):
        local = np.broadcast_to(np.asarray(x), (n,) + np.shape(x))
        return jax.make_array_from_process_local_data(sharding, local,
                                                      (self.num_devices,) + np.shape(x))
      return jax.tree.map(stack, tree)
    if self.mode == 'shard_map':
      sharding = NamedSharding(self.mesh, P())

      def put(x):
        x = np.array(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
      return jax.tree.map(put, tree)
    return jax.tree.map(lambda x: jax.device_put(np.array(x), self.devices[0]), tree)

  def split_batch(self, array):
    """A global batch (host array, the same on every process) -> the per-device split a
    wrapped step expects, of which this process feeds its own devices' rows."""
    if array.shape[0] % self.num_devices:
      raise ValueError(f'batch of {array.shape[0]} does not split over {self.num_devices} devices')
    if self.mode == 'none':
      return array
    per_device = array.reshape((self.num_devices, -1) + array.shape[1:])
    mine = [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]
    local = per_device[mine[0]:mine[-1] + 1]
    if self.mode == 'pmap':
      return local
    return jax.make_array_from_process_local_data(
        NamedSharding(self.mesh, P('data')), local.reshape((-1,) + array.shape[1:]),
        array.shape)

  def to_host(self, tree):
    """Wrapped-layout pytree (replicated) -> one copy as numpy arrays."""
    if self.mode == 'none':
      return jax.device_get(tree)

    def first_copy(x):
      shard = np.asarray(x.addressable_shards[0].data)
      # pmap shards may keep their size-1 device axis; replicated shard_map shards are whole.
      return shard[0] if self.mode == 'pmap' and shard.ndim == x.ndim else shard
    return jax.tree.map(first_copy, tree)


class RunBatch:
  """Places a step for a group of runs (a sweep) on one device: their states and keys are
  stacked along a leading run axis, and `wrap` gives `jax.jit(jax.vmap(step))`, one
  program for the whole group. `frozen_axes` says which frozen inputs are per run (0) and
  which are shared (None), as vmap's in_axes. The runner's interface of DataParallel."""

  def __init__(self, num_runs: int, frozen_axes):
    self.num_runs, self.frozen_axes = num_runs, frozen_axes
    self.num_devices = 1

  def wrap(self, step_fn, num_batch_args: int = 0):
    if num_batch_args:
      raise ValueError('a batch of runs steps on generated samples only (no batch arguments)')
    step_fn = functools.partial(step_fn, axis_name=None)
    return jax.jit(jax.vmap(step_fn, in_axes=(0, self.frozen_axes, 0)), donate_argnums=0)

  def replicate(self, tree):
    """A copy on the device (wrapped steps donate their state)."""
    return jax.tree.map(lambda x: jax.device_put(np.array(x)), tree)

  def to_host(self, tree):
    return jax.device_get(tree)
