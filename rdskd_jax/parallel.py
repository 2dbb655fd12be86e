"""The one place where per-device train steps become data-parallel programs.

A step is written once, for one device, as
    step(state, frozen, root_key, *batch, axis_name) -> (state, metrics)
with every batch reduction a collective over `axis_name` (None: no collectives). Its state
and `frozen` inputs (teacher and generator variables that the step does not train) are
replicated; `batch` arrays, if any, are split along their first axis. `DataParallel`
wraps it for `config.parallel`:
  'none':      jax.jit on one device;
  'pmap':      jax.pmap over the local devices (axis 'batch');
  'shard_map': jax.jit of jax.shard_map over a 1-D 'data' mesh of the local devices.
State is kept in the wrapper's layout between steps; `to_host` brings it back to the
layout-free form that checkpoints and evaluation use.
"""

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ('pmap', 'shard_map', 'none')


class DataParallel:
  """Wraps per-device steps and moves state in and out of the parallel layout."""

  def __init__(self, mode: str):
    if mode not in MODES:
      raise ValueError(f'unknown parallel mode {mode!r}; expected one of {", ".join(MODES)}')
    self.mode = mode
    self.devices = jax.local_devices() if mode != 'none' else jax.local_devices()[:1]
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
                      in_axes=(0, 0, None) + (0,) * num_batch_args)
    sharded = jax.shard_map(step_fn, mesh=self.mesh,
                            in_specs=(P(), P(), P()) + (P('data'),) * num_batch_args,
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)

  def replicate(self, tree):
    """Host or single-device pytree -> replicated input of a wrapped step."""
    if self.mode == 'pmap':
      stacked = jax.tree.map(
          lambda x: np.broadcast_to(np.asarray(x), (self.num_devices,) + np.shape(x)), tree)
      return stacked  # pmap moves each device's copy on the first call and keeps it there.
    if self.mode == 'shard_map':
      return jax.tree.map(lambda x: jax.device_put(np.array(x), NamedSharding(self.mesh, P())),
                          tree)
    # A copy: the wrapped step donates its state, which must not delete the caller's arrays.
    return jax.tree.map(lambda x: jax.device_put(np.array(x), self.devices[0]), tree)

  def split_batch(self, array):
    """A global batch (host array) -> the per-device split a wrapped step expects."""
    if array.shape[0] % self.num_devices:
      raise ValueError(f'batch of {array.shape[0]} does not split over {self.num_devices} devices')
    if self.mode == 'pmap':
      return array.reshape((self.num_devices, -1) + array.shape[1:])
    if self.mode == 'shard_map':
      return jax.device_put(array, NamedSharding(self.mesh, P('data')))
    return array

  def to_host(self, tree):
    """Wrapped-layout pytree (replicated) -> one copy as numpy arrays."""
    if self.mode == 'pmap':
      tree = jax.tree.map(lambda x: x[0], tree)
    return jax.device_get(tree)
