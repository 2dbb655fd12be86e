"""A run's workdir: Orbax checkpoints, the saved teacher and generator variables,
config.json and report.json (`runs.load_run` restores a run from them).

    W/config.json           the config the run was started with (checked on every resume)
    W/report.json           accuracies, seconds, diagnostics (written as stages finish)
    W/checkpoints/<stage>/  the latest two train states of each stage (Orbax)
    W/teacher_variables/    the trained teacher alone, for another run's teacher.checkpoint
    W/generator_variables/  the trained generator alone (and rdskd.json: the teacher it was
                            trained against), for another run's generator.checkpoint
"""

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from rdskd_jax import methods, parallel
from rdskd_jax.errors import ConfigError, StorageError


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` as JSON to `path` through a temporary file (process 0 only)."""
  if not parallel.is_main_process():
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def storage_error(what: str, path: str, error: Exception) -> StorageError:
  """A one-line StorageError for a failed write of `what` at `path`, from an OSError or
  from Orbax (whose errors carry the operating system's code in their text)."""
  code = getattr(error, 'errno', None)
  found = re.search(r"os_error_code='(\d+)'", str(error))
  if code is None and found:
    code = int(found.group(1))
  reason = os.strerror(code) if code else (str(error).strip().splitlines() or [''])[0][:160]
  advice = ('the disk is full: free space, then run the same command again to resume'
            if code == errno.ENOSPC else 'fix that, then run the same command again to resume')
  return StorageError(f'writing {what} to {path} failed ({reason}); {advice}')


def read_json(path: str, fix: str):
  """The JSON content of `path`; a damaged file is a ConfigError that says `fix`."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is damaged (not JSON: {e}); {fix}') from None


def set_aside(path: str) -> str:
  """Renames a damaged file to `<path>.damaged` (never deleted); returns the new name."""
  aside = f'{path}.damaged'
  while os.path.exists(aside):
    aside += '_'
  os.rename(path, aside)
  return aside


def checkpoint_manager(workdir: str, stage: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints', stage),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def restore_like(manager, step, template):
  restored = manager.restore(step, args=ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, template)))
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))


def restore_latest_readable(manager, template, stage: str):
  """(state, step) from the newest checkpoint of `manager` that can be read, else
  (template, 0).

  A checkpoint that cannot be read (a crash during its write, a bad disk) is set aside as
  `<step>.damaged` (renamed, not deleted) with one line on stderr, and the next older one
  is tried; the stage then recomputes the steps after it as an uninterrupted run does.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_like(manager, step, template), step
    except Exception as e:  # Orbax raises many types for a damaged checkpoint.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      path = os.path.join(str(manager.directory), str(step))
      if parallel.is_main_process():
        aside = set_aside(path)
        print(f'[{stage}] checkpoint {path} cannot be read ({reason}); set aside as '
              f'{os.path.basename(aside)}, trying the one before', file=sys.stderr, flush=True)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'set aside {path}')
      manager.reload()
  return template, 0


def save_variables(path: str, variables, what: str = 'the teacher variables') -> None:
  """Orbax checkpoint of a variables tree at `path` (a new directory)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(path), variables)
    checkpointer.wait_until_finished()
  except (OSError, ValueError) as e:  # Orbax reports failed writes as ValueError.
    raise storage_error(what, path, e) from None


GENERATOR_RECORD = 'rdskd.json'  # Inside generator_variables/: what the generator is.


def save_generator_variables(workdir: str, variables, record: Dict[str, Any]) -> None:
  """`<workdir>/generator_variables` with `record` (the teacher's fingerprint, the
  generator's shape fields, its steps) beside the arrays, unless a previous run of the
  workdir saved it. Written last, the record marks the directory complete."""
  path = os.path.join(os.path.abspath(workdir), 'generator_variables')
  done = os.path.exists(os.path.join(path, GENERATOR_RECORD))
  if jax.process_count() > 1:
    done = bool(multihost_utils.broadcast_one_to_all(np.array(done)))
  if done:
    return
  if os.path.exists(path) and parallel.is_main_process():  # An interrupted save.
    shutil.rmtree(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('generator_variables cleared')
  save_variables(path, variables, 'the generator variables')
  try:
    write_json_atomic(os.path.join(path, GENERATOR_RECORD), record)
  except OSError as e:
    raise storage_error('the generator variables', path, e) from None


def restore_generator(config, generator, channels: int, teacher_fingerprint: str):
  """(variables, record) of the generator at `config.generator.checkpoint`, which must
  have been trained against the teacher of `teacher_fingerprint` and fit this run's
  generator settings; each refusal one ConfigError line."""
  given = config.generator.checkpoint
  path = os.path.abspath(given)
  field = f'config.generator.checkpoint={given!r}'
  if not os.path.isfile(os.path.join(path, GENERATOR_RECORD)):
    raise ConfigError(f'{field}: no generator there (expected the generator_variables '
                      'directory of an earlier run, written when its generator stage ended)')
  record = read_json(os.path.join(path, GENERATOR_RECORD), 'train the generator again')
  if record.get('teacher_fingerprint') != teacher_fingerprint:
    raise ConfigError(
        f"{field}: trained against another teacher (fingerprint "
        f"{record.get('teacher_fingerprint')}, this run's {teacher_fingerprint}); give this run "
        "that generator's teacher (config.teacher.checkpoint), or train a generator")
  shape = {'latent_dim': config.generator.latent_dim, 'width': config.generator.width,
           'subpixel': config.generator.subpixel, 'image_size': config.image_size,
           'channels': channels}
  saved = {k: record.get('shape', {}).get(k) for k in shape}
  if saved != shape:
    differ = ', '.join(f'{k} {saved[k]} there, {v} here' for k, v in shape.items()
                       if saved[k] != v)
    raise ConfigError(f'{field}: a generator of other settings ({differ}); give this run '
                      'the same settings, or train a generator')
  template = generator.init(jax.random.key(0), jnp.zeros((2, config.generator.latent_dim)))
  try:
    restored = ocp.StandardCheckpointer().restore(
        path, jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  except Exception as e:  # Orbax raises several types for unreadable checkpoints.
    raise ConfigError(f'{field}: not a readable generator checkpoint '
                      f'({type(e).__name__})') from None
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored)), record


def save_teacher_variables(workdir: str, variables) -> None:
  """`<workdir>/teacher_variables`, unless a previous run of the workdir saved it."""
  path = os.path.join(os.path.abspath(workdir), 'teacher_variables')
  exists = os.path.exists(path)
  if jax.process_count() > 1:  # Every process saves (Orbax coordinates), or none does.
    exists = bool(multihost_utils.broadcast_one_to_all(np.array(exists)))
  if not exists:
    save_variables(path, variables)


# Fields that change how a run is executed or reported, never what it computes; a
# workdir may be resumed with other values of these.
RESUMABLE_FIELDS = ('preset', 'data_dir', 'parallel', 'num_devices', 'distributed',
                    'steps_per_call',
                    'checkpoint_every', 'log_every', 'eval_batch_size', 'max_bad_steps',
                    'student.eval_every', 'image_every', 'diagnostic_samples',
                    'test_examples', 'figures')
_RUN_FILES = ('checkpoints', 'teacher_variables', 'metrics.jsonl', 'report.json',
              'samples.png', 'curves.png', 'config.json', 'normalization.json', 'tensorboard')


# Fields added after runs were written, with the value those runs had: a workdir or
# report.json without one stands for that value.
FIELDS_ADDED_LATER = {'student.generator_batchnorm': 'running', 'num_classes': 0,
                      'channels': 0, 'steps_per_call': 0, 'teacher.width': 1.0,
                      'generator.width': 1.0, 'student.width': 1.0, 'student.reuse': 1,
                      'student.bank_size': 0, 'generator.checkpoint': '', 'test_split': 'test'}


def with_fields_added_later(saved: Dict[str, Any]) -> Dict[str, Any]:
  """A saved config (nested dict) with FIELDS_ADDED_LATER filled in where it lacks them."""
  flat = traverse_util.flatten_dict(saved, sep='.', keep_empty_nodes=True)
  return traverse_util.unflatten_dict({**FIELDS_ADDED_LATER, **flat}, sep='.')


def config_differences(saved: Dict[str, Any], config) -> Dict[str, tuple]:
  """{field: (saved value, new value)} of the fields that change a run's results."""
  old = traverse_util.flatten_dict(with_fields_added_later(saved), sep='.')
  new = traverse_util.flatten_dict(json.loads(json.dumps(config.to_dict())), sep='.')
  # A method's own block (config.dafl, config.zskd, ...) changes nothing in another method's
  # run, and a block added later is absent from older saved configs.
  unused = set(methods.METHODS) - {config.method}
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k not in RESUMABLE_FIELDS and k.split('.')[0] not in unused
          and old.get(k) != new.get(k)}


def make_writable_workdir(workdir: str) -> None:
  """Creates the workdir; a ConfigError when it cannot be written to."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{jax.process_index()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f'workdir {workdir!r}: cannot write there ({e.strerror or type(e).__name__}); '
        'choose a directory you can write to') from None


class WorkdirLock:
  """One run per workdir: within `with`, process 0 holds an exclusive lock on
  `<workdir>/.lock`. The operating system releases it when the process ends, however it
  ends, so a lock is never stale; a second start on the workdir is a ConfigError naming the
  holder."""

  def __init__(self, workdir: str):
    self.workdir, self.file = workdir, None

  def __enter__(self):
    if not parallel.is_main_process():
      return self
    make_writable_workdir(self.workdir)
    path = os.path.join(self.workdir, '.lock')
    self.file = open(path, 'a+')
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self.file.seek(0)
      holder = self.file.read().strip() or 'another process'
      self.file.close()
      self.file = None
      raise ConfigError(f'workdir {self.workdir!r} is in use by another run ({holder}); wait '
                        'for it to end, stop it, or use another workdir') from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f'pid {os.getpid()} on {socket.gethostname()}, since '
                    f'{time.strftime("%Y-%m-%d %H:%M:%S")}')
    self.file.flush()
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      self.file.truncate(0)
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()
      self.file = None


def describe_differences(differences: Dict[str, tuple]) -> str:
  """config_differences as one line: 'field: old there, new now; ...'."""
  return '; '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differences.items())


def prepare_workdir(config, workdir: str, overwrite: bool = False) -> None:
  """Creates the workdir, checks that it is writable, and refuses one that holds a run of
  a different config (`overwrite`: delete that run's files first)."""
  make_writable_workdir(workdir)
  saved_path = os.path.join(workdir, 'config.json')
  if os.path.exists(saved_path):
    try:
      differences = config_differences(read_json(saved_path, (
          'restore it, or run with --overwrite to delete the run there')), config)
    except ConfigError:
      if not overwrite:
        raise
      differences = {'config.json': ('damaged', 'new')}
    if differences and not overwrite:
      raise ConfigError(
          f'workdir {workdir!r} holds a run of another config '
          f'({describe_differences(differences)}); use another workdir, or --overwrite to '
          'delete that run')
    if differences and parallel.is_main_process():
      for name in _RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
  if not os.path.exists(saved_path):
    write_json_atomic(saved_path, config.to_dict())
