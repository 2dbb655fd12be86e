"""RDSKD (Han, Park, Wang and Liu, ICASSP 2021): the paper's method. A generator is
trained against the frozen teacher on authenticity, class diversity and inter-sample
diversity with an exponential penalty on loss increments (`losses.rdskd_generator_loss`;
the authors' PengchaoHan/RDSKD); then, generator and teacher frozen, the student is
distilled on its samples alone (KD at temperature T), every batch fresh
(`student.reuse=1`, the authors' way) or partly drawn from the sample bank (`bank.py`).

Its settings are the shared `config.generator` and `config.student` blocks; a trained
generator can be reused (`generator.checkpoint`).
"""

import functools
import os

import jax
import jax.numpy as jnp

from rdskd_jax import bank, config_checks, losses, models, train_steps
from rdskd_jax import teacher as teacher_lib
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.errors import RunStopped
from rdskd_jax.methods import base
from rdskd_jax.stages import init_key

NAME = 'rdskd'
STAGES = ('generator', 'student')
BATCHNORM_PRIOR_FIELDS = ('generator.bn_prior_weight',)
READS_GENERATOR_CHECKPOINT = True  # generator.checkpoint skips its generator stage.
# A vmapped sweep's learning rates: stage -> {path in its state ('': the root): field}.
LEARNING_RATES = {'generator': {'': 'generator.learning_rate'},
                  'student': {'': 'student.learning_rate'}}


# ------------------------------------------------------------------------------ steps

def generator_step(state, frozen, root_key, *, generator, teacher, tx, batch_size,
                   latent_dim, epoch_length, axis_name, bn_prior_weight=0.0):
  """One RDSKD generator step (teacher frozen in inference mode).

  The loss references refresh, after this step's loss is computed, when the step is at
  index 1 of its epoch, as in the authors' code.
  """
  z = train_steps.local_noise(jax.random.fold_in(root_key, state['step']), batch_size,
                              latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  ref_one_hot, ref_entropy = state['loss_refs'][0], state['loss_refs'][1]

  def loss_fn(params):
    images, batch_stats, teacher_logits, _, bn_prior = train_steps.generate_for_teacher(
        generator, params, state['batch_stats'], z, teacher, frozen['teacher'],
        bn_prior_weight, axis_name)
    total, aux = losses.rdskd_generator_loss(images, teacher_logits, ref_one_hot,
                                             ref_entropy, axis_name=axis_name)
    total, aux = train_steps.with_bn_prior(total, aux, bn_prior, bn_prior_weight)
    return total, (aux, batch_stats)

  (total, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      train_steps.in_compute_precision(state['params'], generator.dtype))
  refresh = state['step'] % epoch_length == 1
  new_refs = jnp.where(refresh, jnp.stack([aux['one_hot'], aux['information_entropy']]),
                       state['loss_refs']).astype(state['loss_refs'].dtype)
  state = train_steps.apply_gradients(state, grads, tx, axis_name, total,
                                      batch_stats=batch_stats, loss_refs=new_refs)
  return state, dict(aux, total=total)


def student_step(state, frozen, root_key, *, generator, teacher, student, tx, batch_size,
                 latent_dim, temperature, axis_name, generator_batchnorm='running'):
  """One KD step of the student on fresh samples of the frozen generator (its BatchNorm
  in `generator_batchnorm` mode, models.generate)."""
  z = train_steps.local_noise(jax.random.fold_in(root_key, state['step']), batch_size,
                              latent_dim, axis_name)
  images = models.generate(generator, frozen['generator'], z, generator_batchnorm, axis_name)
  teacher_logits, _ = teacher.apply(frozen['teacher'], images, train=False)
  state, loss = train_steps.kd_update(
      state, images, teacher_logits, student=student.clone(axis_name=axis_name), tx=tx,
      temperature=temperature, axis_name=axis_name)
  return state, {'kd': loss}


# ---------------------------------------------------------------------- stage set-up

def generator_setup(config, generator, teacher):
  """The generator's initial train state and its per-device step (teacher frozen)."""
  gcfg = config.generator
  gen_vars = train_steps.init_variables(generator, init_key(config, 'generator'),
                                        jnp.zeros((2, gcfg.latent_dim)))
  tx = train_steps.optimizer(gcfg, gcfg.steps, gcfg.epoch_length)
  state = train_steps.new_train_state(gen_vars['params'], tx,
                                      batch_stats=gen_vars['batch_stats'],
                                      loss_refs=jnp.zeros(2, jnp.float32))
  step_fn = functools.partial(generator_step, generator=generator, teacher=teacher, tx=tx,
                              batch_size=gcfg.batch_size, latent_dim=gcfg.latent_dim,
                              epoch_length=gcfg.epoch_length,
                              bn_prior_weight=gcfg.bn_prior_weight)
  return state, step_fn


def student_setup(config, channels: int, num_classes: int, generator, teacher, student):
  """The student's initial train state and its per-device step (generator and teacher
  frozen). With student.reuse > 1 the state holds the bank, empty until the runner
  builds it (`bank.derived`)."""
  scfg = config.student
  params, collections = train_steps.classifier_init(
      student, init_key(config, 'student'), (config.image_size, config.image_size, channels))
  tx = train_steps.optimizer(scfg, scfg.steps, scfg.epoch_length)
  state = train_steps.new_train_state(params, tx, **collections)
  common = dict(generator=generator, teacher=teacher, student=student, tx=tx,
                batch_size=scfg.batch_size, latent_dim=config.generator.latent_dim,
                temperature=scfg.temperature)
  if scfg.reuse == 1:
    return state, functools.partial(student_step, **common,
                                    generator_batchnorm=scfg.generator_batchnorm)
  state['bank'] = bank.empty_bank(config, channels, num_classes)
  return state, functools.partial(bank.bank_student_step, **common, reuse=scfg.reuse)


# ----------------------------------------------------------------------------- checks

def check(config, num_devices: int) -> None:
  """When this method runs: the student's bank (student.reuse, student.bank_size), which
  serves its student stage alone."""
  scfg = config.student
  reuse, size, batch = scfg.reuse, scfg.bank_size, scfg.batch_size
  if config.method != NAME or reuse == 1:
    return
  config_checks.require(batch % reuse == 0, 'student.reuse', reuse,
                        f'a divisor of student.batch_size={batch} (the fresh images of a '
                        'step, batch_size/reuse, are a whole number)')
  fresh = batch // reuse
  config_checks.require(fresh % num_devices == 0, 'student.reuse', reuse,
                        f'a value leaving student.batch_size/reuse={fresh} fresh images a '
                        f'step divisible among the {num_devices} devices')
  config_checks.require(
      scfg.generator_batchnorm == 'running', 'student.generator_batchnorm',
      scfg.generator_batchnorm, "'running' with student.reuse > 1 (the bank stores each "
      "image's logits, which in 'batch' mode would depend on the batch it came in)")
  effective = size or 16 * batch
  config_checks.require(effective >= batch, 'student.bank_size', size,
                        f'at least a batch, student.batch_size={batch} images (or 0: 16 '
                        'batches)')
  config_checks.require(effective % fresh == 0, 'student.bank_size', size,
                        f'a multiple of the {fresh} fresh images of a step (student.'
                        'batch_size/reuse), which the bank takes a block at a time')


# --------------------------------------------------------------------------- training

def train(ctx: base.Context) -> base.Outcome:
  """The generator stage (or a reused generator), then the student stage."""
  config = ctx.config
  gen_vars, entries, seconds = _generator(ctx)
  ctx.report.add('generator', entries)
  ctx.diagnose_generator(gen_vars, entries['steps'])
  state, step_fn = student_setup(config, ctx.channels, ctx.num_classes, ctx.generator,
                                 ctx.teacher, ctx.student)
  state, student_seconds = ctx.stage(
      'student', state, {'teacher': ctx.teacher_vars, 'generator': gen_vars}, step_fn,
      config.student.steps, ctx.student_accuracy, config.student.eval_every,
      derived=bank.derived(config, ctx.generator, ctx.teacher))
  return base.Outcome(
      student_vars=train_steps.variables_of(state), student_steps=config.student.steps,
      student_seconds=ctx.report.total_seconds('student', student_seconds),
      seconds=seconds + student_seconds, generator_vars=gen_vars,
      student_entries=bank.report(config, state))


def _generator(ctx: base.Context):
  """The frozen generator of the student stage: from config.generator.checkpoint (its
  stage skipped), else trained (or resumed) here and saved alone in
  `<workdir>/generator_variables`. Returns (variables, report entries, loop seconds)."""
  config, gcfg = ctx.config, ctx.config.generator
  if gcfg.checkpoint:
    gen_vars, record = workdir_lib.restore_generator(config, ctx.generator, ctx.channels,
                                                     ctx.teacher_fingerprint)
    entries = {'checkpoint': os.path.abspath(gcfg.checkpoint), 'steps': record['steps'],
               'seconds': 0.0}
    seconds = 0.0
  else:
    state, step_fn = generator_setup(config, ctx.generator, ctx.teacher)
    state, seconds = ctx.stage('generator', state, {'teacher': ctx.teacher_vars}, step_fn,
                               gcfg.steps, ctx.watch_generator, config.image_every)
    gen_vars = train_steps.variables_of(state)
    workdir_lib.save_generator_variables(ctx.workdir, gen_vars, {
        'teacher_fingerprint': ctx.teacher_fingerprint, 'steps': gcfg.steps,
        'shape': {'latent_dim': gcfg.latent_dim, 'width': gcfg.width,
                  'subpixel': gcfg.subpixel, 'image_size': config.image_size,
                  'channels': ctx.channels}})
    entries = {'steps': gcfg.steps,
               'seconds': ctx.report.total_seconds('generator', seconds)}
  entries['fingerprint'] = teacher_lib.fingerprint(gen_vars)
  ctx.report.check_same_network('generator', entries['fingerprint'])
  return gen_vars, entries, seconds


def restore(loader: base.Loader):
  """(generator variables, student variables or None, None) from the latest checkpoints;
  RunStopped before the generator has one."""
  config = loader.config
  generator_state = (None if config.generator.checkpoint else loader.latest(
      'generator', generator_setup(config, loader.generator, loader.teacher)[0]))
  template = student_setup(config, loader.channels, loader.num_classes, loader.generator,
                           loader.teacher, loader.student)[0]
  # Checkpoints leave the bank out (runner.run_stage's `derived`); a loaded run needs none.
  student_state = loader.latest('student', {k: v for k, v in template.items() if k != 'bank'})
  if config.generator.checkpoint:
    generator_vars, _ = workdir_lib.restore_generator(
        config, loader.generator, loader.channels, teacher_lib.fingerprint(loader.teacher_vars))
  elif generator_state is None:
    raise RunStopped(f'{loader.workdir!r} has no generator checkpoint yet')
  else:
    generator_vars = train_steps.variables_of(generator_state)
  student_vars = None if student_state is None else train_steps.variables_of(student_state)
  return generator_vars, student_vars, None


def train_group(group: base.Group):
  """A sweep's vmapped runs: (stacked generator variables, student variables, seconds)."""
  setups = [generator_setup(u, group.generator, group.teacher) for u in group.unit_configs]
  config = group.configs[0]
  state, generator_seconds = group.stage('generator', [s for s, _ in setups], setups[0][1],
                                         config.generator.steps)
  gen_vars = train_steps.variables_of(state)
  setups = [student_setup(u, group.channels, group.num_classes, group.generator,
                          group.teacher, group.student) for u in group.unit_configs]
  state, student_seconds = group.stage(
      'student', [s for s, _ in setups], setups[0][1], config.student.steps,
      frozen={'generator': gen_vars}, derived=bank.derived(config, group.generator,
                                                           group.teacher))
  return gen_vars, train_steps.variables_of(state), {'generator': generator_seconds,
                                                     'student': student_seconds}


def cost(config):
  """The generated samples the generator and the student were trained on; with the bank,
  also the student's fresh ones (the batches' images, of which 1/reuse were fresh, and
  the bank's first filling)."""
  samples = {'generator_samples': config.generator.steps * config.generator.batch_size,
             'student_samples': config.student.steps * config.student.batch_size}
  if config.student.reuse > 1:
    samples['student_fresh_samples'] = (samples['student_samples'] // config.student.reuse
                                        + bank.bank_size(config))
  return samples
