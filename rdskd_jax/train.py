"""The RDSKD pipeline: teacher on real data, generator against the frozen teacher, student
distilled on generated samples only, both classifiers evaluated on the real test split.

`train_and_evaluate(config, workdir)` is the one entry point of the command line, the tests
and the notebooks. Each stage resumes from its latest checkpoint in the workdir, and its
random streams derive from (seed, stage, step), so a resumed run computes what an
uninterrupted one does. Where things live: each method's stages and steps in its module
under `methods/` (reached through `methods.get(config.method)`), the machinery they share
in `train_steps.py`, the teacher's stage and the run's keys in `stages.py`, the loop in
`runner.py`, the workdir's files in `workdir.py`, the measures in `evaluation.py` and
`diagnostics.py`.
"""

import contextlib
import os
import time
from typing import Any, Dict

import jax

from rdskd_jax import (config_checks, data, diagnostics, evaluation, methods, metrics,
                       parallel, plot, runner, stages, teacher as teacher_lib, train_steps,
                       workdir as workdir_lib)
from rdskd_jax.errors import ConfigError
from rdskd_jax.methods import base


def setup_parallel(config) -> parallel.DataParallel:
  """Joins a multi-process run if asked, checks the config against the devices there
  are, and returns the data-parallel wrapper of `config.parallel`."""
  parallel.initialize_distributed(config)
  config_checks.validate(config, jax.device_count())
  try:
    return parallel.DataParallel(config.parallel, config.num_devices)
  except ValueError as e:  # What validate cannot see: a multi-process run's constraints.
    raise ConfigError(f'config.parallel={config.parallel!r}, '
                      f'config.num_devices={config.num_devices}: {e}') from None


def teacher_variables(config, workdir, par, model, log, channels, given=None):
  """The frozen teacher and what the report says of it: `given` (module, variables) from
  Python, else from config.teacher.checkpoint (our teacher_variables or a PyTorch
  state_dict), else trained (or resumed) here on the real train split and saved alone in
  `<workdir>/teacher_variables`, the directory another run's `teacher.checkpoint` takes."""
  if given is not None:
    return given[1], {'source': f'python ({type(given[0]).__name__})', 'seconds': 0.0}
  if config.teacher.checkpoint:
    variables = teacher_lib.restore_teacher(config, model, channels)
    return variables, {'checkpoint': os.path.abspath(config.teacher.checkpoint), 'seconds': 0.0}
  images, labels = data.load_split(config, 'train', config.teacher.max_train_examples)
  state, step_fn, total, batches = stages.teacher_setup(config, model, channels, images,
                                                        labels)
  state, seconds = runner.run_stage('teacher', config, workdir, par, state, {}, step_fn,
                                    total, log, stages.stage_key(config, 'teacher'), batches)
  variables = train_steps.variables_of(state)
  workdir_lib.save_teacher_variables(workdir, variables)
  return variables, {'steps': total, 'seconds': seconds}


def _check_outside_teacher(config, given, num_classes, channels):
  """The checks on a teacher this run does not train: one must exist without a dataset,
  and a Python module must keep the contract of `rdskd_jax.teacher`."""
  if not config.dataset and given is None and not config.teacher.checkpoint:
    raise ConfigError("config.dataset='': expected a trained teacher (config.teacher."
                      'checkpoint, or teacher=(module, variables) from Python); training '
                      'one needs a dataset')
  if given is not None:
    if not (isinstance(given, tuple) and len(given) == 2):
      raise ConfigError(f'teacher={type(given).__name__}: expected (module, variables)')
    teacher_lib.check_contract(given[0], given[1], (config.image_size,) * 2 + (channels,),
                               num_classes, f'teacher {type(given[0]).__name__}')


def machine():
  """What ran this process: the CPU's model name and core count, and the accelerator's
  kind. Training seconds compare only between runs on one kind of machine."""
  cpu = ''
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name')), '')
  except OSError:  # Not Linux: the platform module's coarser name.
    import platform
    cpu = platform.processor()
  return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'device_kind': jax.devices()[0].device_kind}


class Report:
  """report.json, rewritten whole (atomically) after each stage. Training seconds add up
  over the runs of a workdir: a resumed stage adds the time of its rest."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'report.json')
    self.content = {}
    if os.path.exists(self.path):
      try:
        self.content = workdir_lib.read_json(self.path, '')
      except ConfigError:  # Rebuilt from the checkpoints; its seconds restart from here.
        if parallel.is_main_process():
          aside = workdir_lib.set_aside(self.path)
          metrics.say(f'note: {self.path} was damaged (not JSON), set aside as '
                      f'{os.path.basename(aside)}; rebuilding it from the checkpoints')

  def total_seconds(self, section: str, this_run: float) -> float:
    """A stage's training seconds over all runs of the workdir."""
    return self.content.get(section, {}).get('seconds', 0.0) + this_run

  def check_same_network(self, section: str, fingerprint: str) -> None:
    """A ConfigError when the workdir's report records another network (by fingerprint)
    in `section`: a resumed run must be given the networks it started with."""
    saved = self.content.get(section, {}).get('fingerprint')
    if saved and saved != fingerprint:
      raise ConfigError(f'{os.path.dirname(self.path)} was run with another {section} '
                        f'(fingerprint {saved}, this one {fingerprint}); give it the same '
                        f'{section}, or another workdir')

  def add(self, section: str, entries: Dict[str, Any]) -> None:
    self.content[section] = {**self.content.get(section, {}), **entries}
    workdir_lib.write_json_atomic(self.path, self.content)


def _accuracy_name(config) -> str:
  """What report.json's test_accuracy measures: accuracy on config.test_split."""
  return ('test accuracy' if config.test_split == 'test' else
          f'accuracy on {config.test_split}')


def train_and_evaluate(config, workdir: str, overwrite: bool = False,
                       teacher=None) -> Dict[str, Any]:
  """Runs all stages (resuming any that are done or partly done); returns the report.

  A workdir that holds a run of a different config is refused unless `overwrite`.
  `teacher=(module, variables)`: a trained Flax teacher in place of config.teacher (the
  contract is in `rdskd_jax.teacher`); a resumed run must be given the same one.
  """
  t_call = time.perf_counter()
  par = setup_parallel(config)
  with workdir_lib.WorkdirLock(workdir), contextlib.ExitStack() as closing:
    return _run_stages(config, workdir, overwrite, par, t_call, teacher, closing)


def _run_stages(config, workdir, overwrite, par, t_call, given_teacher, closing):
  """train_and_evaluate's work, with the workdir locked."""
  workdir_lib.prepare_workdir(config, workdir, overwrite)
  outside = given_teacher is not None or bool(config.teacher.checkpoint)
  config, dataset_notes = data.resolve_dataset_fields(config, workdir, outside)
  report = Report(workdir)
  num_classes, channels = dataset_notes['num_classes'], dataset_notes['channels']
  _check_outside_teacher(config, given_teacher, num_classes, channels)
  log = closing.enter_context(metrics.MetricsLog(workdir))
  report.content.update({
      'dataset': config.dataset, 'dataset_fields': dataset_notes,
      'preset': config.get('preset', ''), 'devices': par.num_devices,
      'processes': jax.process_count(), 'parallel': config.parallel,
      'platform': jax.default_backend(), 'jax_version': jax.__version__,
      'machine': machine(),
      'seed': config.seed, 'config': config.to_dict()})
  test_images = test_labels = None  # Without a dataset nothing is evaluated on real data.
  if config.dataset:
    test_images, test_labels = data.load_split(config, config.test_split,
                                               config.test_examples, per_process=True)

  def test_accuracy(model, variables):
    """Reporting only: {'test_accuracy': accuracy on config.test_split}, {} without one."""
    if test_images is None:
      return {}
    return {'test_accuracy': evaluation.evaluate(model, variables, test_images, test_labels,
                                                 config.eval_batch_size)}

  teacher, generator, student = stages.build_networks(config, num_classes, channels,
                                                      given_teacher is None)
  if given_teacher is not None:
    teacher = given_teacher[0]
  t0 = time.perf_counter()
  teacher_vars, teacher_report = teacher_variables(config, workdir, par, teacher, log,
                                                   channels, given_teacher)
  method = methods.get(config.method)
  for field in method.BATCHNORM_PRIOR_FIELDS:
    section, name = field.split('.')
    if config[section][name] > 0 and 'batch_stats' not in teacher_vars:
      raise ConfigError(
          f'config.{field}={config[section][name]}: expected 0 for teacher '
          f'{config.teacher.model!r}, which has no BatchNorm statistics to match')
  teacher_report['fingerprint'] = teacher_lib.fingerprint(teacher_vars)
  report.check_same_network('teacher', teacher_report['fingerprint'])
  stage_seconds = teacher_report['seconds']  # In this call's stage loops (steps, checkpoints).
  teacher_report.update(test_accuracy(teacher, teacher_vars))
  if 'steps' in teacher_report:  # Trained here: resumed runs add their seconds.
    teacher_report['seconds'] = report.total_seconds('teacher', teacher_report['seconds'])
  report.add('teacher', teacher_report)
  if 'test_accuracy' in teacher_report:
    metrics.say(f'[teacher] {_accuracy_name(config)} {teacher_report["test_accuracy"]:.4f} '
                f'({time.perf_counter() - t0:.0f}s)')

  gcfg = config.generator
  watch_key = stages.stage_key(config, 'diagnostics')

  def watch_generator(gen_state):
    """Reporting only: a sample grid for TensorBoard and the coverage of 512 samples."""
    variables = train_steps.variables_of(gen_state)
    images = diagnostics.generated_images(generator, variables, gcfg.latent_dim, watch_key, 512)
    probs, features = diagnostics.teacher_outputs(teacher, teacher_vars, images)
    log.write_images('generator', int(gen_state['step']),
                     {'samples': plot.sample_grid(images[:64], config)})
    return diagnostics.sample_statistics(probs, features)

  def student_accuracy(student_state):
    """Reporting only: the student's accuracy on the test split."""
    return test_accuracy(student, train_steps.variables_of(student_state))

  def diagnose(step, measure):
    """Reporting only, once per run: report.json's diagnostics of the samples."""
    if 'diagnostics' in report.content:
      return
    values = measure()
    log.write('diagnostics', step, values)
    log.flush()
    report.add('diagnostics', values)
    metrics.say('[diagnostics] ' + ' '.join(f'{k}={v:.4g}' for k, v in values.items()))

  def stage(name, state, frozen, step_fn, total, report_fn, report_every, derived=None):
    return runner.run_stage(name, config, workdir, par, state, frozen, step_fn, total, log,
                            stages.stage_key(config, name), report_every=report_every,
                            report_fn=report_fn, derived=derived)

  outcome = method.train(base.Context(
      config=config, workdir=workdir, report=report, teacher=teacher, generator=generator,
      student=student, teacher_vars=teacher_vars,
      teacher_fingerprint=teacher_report['fingerprint'], channels=channels,
      num_classes=num_classes, stage=stage, watch_generator=watch_generator,
      student_accuracy=student_accuracy,
      diagnose_generator=lambda variables, step: diagnose(step, lambda: (
          diagnostics.generator_diagnostics(
              generator, variables, teacher, teacher_vars, gcfg.latent_dim, watch_key,
              config.diagnostic_samples, test_images=test_images,
              **evaluation.sampling(config)))),
      diagnose_images=lambda images, step: diagnose(step, lambda: (
          diagnostics.image_diagnostics(images, teacher, teacher_vars, test_images)))))
  stage_seconds += outcome.seconds
  _report_student(config, workdir, report, outcome, networks=(teacher, generator, student),
                  teacher_vars=teacher_vars, test_accuracy=test_accuracy)
  # This call alone (a resumed run times its own part): the time outside the stages' loops
  # is set-up, evaluation, the reporting callbacks, diagnostics, agreement and figures.
  wall = time.perf_counter() - t_call
  report.add('timing', {'call_seconds': wall, 'stage_loop_seconds': stage_seconds,
                        'outside_stage_loops_seconds': wall - stage_seconds})
  return report.content


def _report_student(config, workdir, report, outcome, *, networks, teacher_vars,
                    test_accuracy):
  """The student's entries in report.json (test accuracy for reporting, agreement with the
  teacher on generated samples, or on the synthesised set of a method without a
  generator) and the figures."""
  teacher, generator, student = networks
  if outcome.images is None:
    agreement = evaluation.generated_agreement(
        generator, outcome.generator_vars, teacher, teacher_vars, student,
        outcome.student_vars, config.generator.latent_dim, stages.stage_key(config, 'fidelity'),
        num_samples=config.student.agreement_samples, **evaluation.sampling(config))
    on = 'generated samples'
  else:
    agreement = evaluation.image_agreement(teacher, teacher_vars, student, outcome.student_vars,
                                           outcome.images[:config.student.agreement_samples])
    on = 'the synthesised set'
  accuracy = test_accuracy(student, outcome.student_vars)
  report.add('student', {'steps': outcome.student_steps, **accuracy,
                         'generated_agreement': agreement, 'seconds': outcome.student_seconds,
                         **(outcome.student_entries or {})})
  metrics.say(f'[student] {_accuracy_name(config)} {accuracy["test_accuracy"]:.4f}' if accuracy else
              f'[student] agreement with the teacher on {on} {agreement:.4f}')
  if config.figures and parallel.is_main_process():
    path = os.path.join(workdir, 'samples.png')
    if outcome.images is None:
      plot.save_samples(path, generator, outcome.generator_vars, teacher, teacher_vars,
                        config.generator.latent_dim, config, stages.samples_key(config))
    else:
      plot.save_class_grid(path, outcome.images[-512:], teacher, teacher_vars, config)
    plot.save_curves(workdir)
