"""A run's workdir: Orbax checkpoints, the saved teacher variables, config.json and
report.json, and `load_run`, which restores a finished (or partly finished) run.

    W/config.json           the config the run was started with (checked on every resume)
    W/report.json           accuracies, seconds, diagnostics (written as stages finish)
    W/checkpoints/<stage>/  the latest two train states of each stage (Orbax)
    W/teacher_variables/    the trained teacher alone, for another run's teacher.checkpoint
"""

import json
import os
import shutil
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from rdskd_jax import parallel, stages, train_steps
from rdskd_jax.errors import ConfigError, RunStopped


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` as JSON to `path` through a temporary file (process 0 only)."""
  if not parallel.is_main_process():
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def checkpoint_manager(workdir: str, stage: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints', stage),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def restore_like(manager, step, template):
  restored = manager.restore(step, args=ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, template)))
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))


def restore_teacher(config, model, channels: int):
  """The variables saved at `config.teacher.checkpoint` (a `teacher_variables` directory)."""
  path = os.path.abspath(config.teacher.checkpoint)
  if not os.path.isdir(path):
    raise ConfigError(
        f'config.teacher.checkpoint={config.teacher.checkpoint!r}: no such checkpoint '
        'directory (expected the teacher_variables directory of an earlier run)')
  template = model.init(jax.random.key(0), jnp.zeros(
      (1, config.image_size, config.image_size, channels)))
  try:
    restored = ocp.StandardCheckpointer().restore(
        path, jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  except Exception as e:  # Orbax raises several types for unreadable checkpoints.
    raise ConfigError(
        f'config.teacher.checkpoint={config.teacher.checkpoint!r}: not a readable '
        f'{config.teacher.model} checkpoint ({type(e).__name__})') from None
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))


def save_teacher_variables(workdir: str, variables) -> None:
  """`<workdir>/teacher_variables`, unless a previous run of the workdir saved it."""
  path = os.path.join(os.path.abspath(workdir), 'teacher_variables')
  exists = os.path.exists(path)
  if jax.process_count() > 1:  # Every process saves (Orbax coordinates), or none does.
    exists = bool(multihost_utils.broadcast_one_to_all(np.array(exists)))
  if not exists:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, variables)
    checkpointer.wait_until_finished()


# Fields that change how a run is executed or reported, never what it computes; a
# workdir may be resumed with other values of these.
RESUMABLE_FIELDS = ('preset', 'data_dir', 'parallel', 'num_devices', 'distributed',
                    'checkpoint_every', 'log_every', 'eval_batch_size', 'max_bad_steps',
                    'student.eval_every', 'image_every', 'diagnostic_samples')
_RUN_FILES = ('checkpoints', 'teacher_variables', 'metrics.jsonl', 'report.json',
              'samples.png', 'curves.png', 'config.json', 'normalization.json', 'tensorboard')


# Fields added after runs were written, with the value those runs had: a workdir or
# report.json without one stands for that value.
FIELDS_ADDED_LATER = {'student.generator_batchnorm': 'running'}


def with_fields_added_later(saved: Dict[str, Any]) -> Dict[str, Any]:
  """A saved config (nested dict) with FIELDS_ADDED_LATER filled in where it lacks them."""
  flat = traverse_util.flatten_dict(saved, sep='.', keep_empty_nodes=True)
  return traverse_util.unflatten_dict({**FIELDS_ADDED_LATER, **flat}, sep='.')


def config_differences(saved: Dict[str, Any], config) -> Dict[str, tuple]:
  """{field: (saved value, new value)} of the fields that change a run's results."""
  old = traverse_util.flatten_dict(with_fields_added_later(saved), sep='.')
  new = traverse_util.flatten_dict(json.loads(json.dumps(config.to_dict())), sep='.')
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)}


def prepare_workdir(config, workdir: str, overwrite: bool = False) -> None:
  """Creates the workdir, checks that it is writable, and refuses one that holds a run of
  a different config (`overwrite`: delete that run's files first)."""
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
  saved_path = os.path.join(workdir, 'config.json')
  if os.path.exists(saved_path):
    differences = config_differences(json.load(open(saved_path)), config)
    if differences and not overwrite:
      listed = '; '.join(f'{k}: {a!r} there, {b!r} now' for k, a, b in
                         ((k, *v) for k, v in differences.items()))
      raise ConfigError(
          f'workdir {workdir!r} holds a run of another config ({listed}); use another '
          'workdir, or --overwrite to delete that run')
    if differences and parallel.is_main_process():
      for name in _RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
  if not os.path.exists(saved_path):
    write_json_atomic(saved_path, config.to_dict())


class Run(NamedTuple):
  """A run's networks as restored from its workdir (see `load_run`)."""
  config: Any
  teacher: Any
  teacher_vars: Any
  generator: Any
  generator_vars: Any
  student: Any
  student_vars: Any  # None until the student stage has a checkpoint.


def load_run(workdir: str) -> Run:
  """The config (as run) and the trained networks of a workdir, from report.json and the
  latest checkpoints; for plots and notebooks. Raises RunStopped when the run has not
  got as far as a generator checkpoint."""
  report_path = os.path.join(workdir, 'report.json')
  if not os.path.exists(report_path) or 'dataset_fields' not in json.load(open(report_path)):
    raise RunStopped(f'{workdir!r} has no report.json of this version: run the job first')
  report = json.load(open(report_path))
  config = ml_collections.ConfigDict(with_fields_added_later(report['config']))
  fields = report['dataset_fields']
  teacher, generator, student = stages.build_networks(config, fields['num_classes'], fields['channels'])
  source = config.teacher.checkpoint or os.path.join(workdir, 'teacher_variables')
  with config.unlocked():
    config.teacher.checkpoint = source
  teacher_vars = restore_teacher(config, teacher, fields['channels'])

  def latest(stage, template):
    manager = checkpoint_manager(workdir, stage)
    step = manager.latest_step()
    return None if step is None else restore_like(manager, step, template)

  if config.method == 'dafl':
    joint = latest('dafl', stages.dafl_setup(config, fields['channels'], generator, teacher,
                                      student)[0])
    generator_state, student_state = (None, None) if joint is None else (
        joint['generator'], joint['student'])
  else:
    generator_state = latest('generator', stages.generator_setup(config, generator, teacher)[0])
    student_state = latest('student', stages.student_setup(config, fields['channels'], generator,
                                                    teacher, student)[0])
  if generator_state is None:
    raise RunStopped(f'{workdir!r} has no generator checkpoint yet')
  generator_vars = train_steps.variables_of(generator_state)
  student_vars = None if student_state is None else train_steps.variables_of(student_state)
  return Run(config, teacher, teacher_vars, generator, generator_vars, student, student_vars)
