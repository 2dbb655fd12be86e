"""`load_run`: a run's config and trained networks, restored from its workdir, for plots
and notebooks."""

import os
from typing import Any, NamedTuple

import ml_collections

from rdskd_jax import methods, stages
from rdskd_jax import teacher as teacher_lib
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.errors import ConfigError, RunStopped
from rdskd_jax.methods import base


class Run(NamedTuple):
  """A run's networks as restored from its workdir (see `load_run`)."""
  config: Any
  teacher: Any
  teacher_vars: Any
  generator: Any
  generator_vars: Any
  student: Any
  student_vars: Any  # None until the student stage has a checkpoint.
  images: Any = None  # A method without a generator: its synthesised set (generator None).


def load_run(workdir: str, teacher=None) -> Run:
  """The config (as run) and the trained networks of a workdir, from report.json and the
  latest checkpoints. Raises RunStopped when the run has not got as far as a generator
  checkpoint (for a method without a generator, its stage's first checkpoint; its Run
  holds the images synthesised by then).

  `teacher`: (module, variables), the Flax teacher a run was given from Python
  (`train.train_and_evaluate(..., teacher=...)`); such a run saved no teacher, and the
  one given must have the fingerprint its report.json records."""
  report_path = os.path.join(workdir, 'report.json')
  fix = "run the job's command again to rebuild it"
  if (not os.path.exists(report_path)
      or 'dataset_fields' not in workdir_lib.read_json(report_path, fix)):
    raise RunStopped(f'{workdir!r} has no report.json of this version: run the job first')
  report = workdir_lib.read_json(report_path, fix)
  config = ml_collections.ConfigDict(workdir_lib.with_fields_added_later(report['config']))
  fields = report['dataset_fields']
  teacher_module, generator, student = stages.build_networks(config, fields['num_classes'],
                                                             fields['channels'])
  ran_with = report.get('teacher', {})
  if teacher is not None:
    teacher_module, teacher_vars = teacher
    given = teacher_lib.fingerprint(teacher_vars)
    if ran_with.get('fingerprint') not in (None, given):
      raise ConfigError(f'{workdir!r} was run with another teacher (fingerprint '
                        f"{ran_with['fingerprint']}, the one given {given})")
  elif str(ran_with.get('source', '')).startswith('python'):
    raise ConfigError(f"{workdir!r} was run with a teacher given from Python "
                      f"({ran_with['source']}), which no workdir holds; pass it: "
                      'load_run(workdir, teacher=(module, variables))')
  else:
    with config.unlocked():
      config.teacher.checkpoint = (config.teacher.checkpoint or
                                   os.path.join(workdir, 'teacher_variables'))
    teacher_vars = teacher_lib.restore_teacher(config, teacher_module, fields['channels'])

  def latest(stage, template):
    manager = workdir_lib.checkpoint_manager(workdir, stage)
    step = manager.latest_step()
    return None if step is None else workdir_lib.restore_like(manager, step, template)

  generator_vars, student_vars, images = methods.get(config.method).restore(base.Loader(
      workdir=workdir, config=config, channels=fields['channels'],
      num_classes=fields['num_classes'], teacher=teacher_module, generator=generator,
      student=student, teacher_vars=teacher_vars, latest=latest))
  return Run(config, teacher_module, teacher_vars, None if images is not None else generator,
             generator_vars, student, student_vars, images)
