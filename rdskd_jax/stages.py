"""Each stage's networks, initial train state and per-device step, built from a config;
and the keys of the run's random streams.

The main run (`train.py`), the sweep and `workdir.load_run` build stages here, so a
checkpoint always restores into the state it was saved from.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rdskd_jax import config_checks, data, losses, models, train_steps
from rdskd_jax.errors import ConfigError


# Every random stream of a run is folded from the one root key, key(seed), by name: the
# stages' per-step noise, the reporting streams, and each network's initial weights. No two
# streams of one run share a key, and none equals a stream of another seed.
STAGE_KEYS = {'teacher': 0, 'generator': 1, 'student': 2, 'samples': 3, 'fidelity': 4,
              'diagnostics': 5, 'dafl': 6,
              'teacher_init': 7, 'generator_init': 8, 'student_init': 9, 'dfad': 10,
              'deepinversion': 11, 'zskd': 12}
# Methods that train generator and student together, in one stage named after the method.
JOINT_METHODS = ('dafl', 'dfad')
# Methods without a generator: inputs are optimised into a synthesised set, kept in the
# stage's state (its 'bank'), on which the student trains; one stage named after the method.
SYNTHESIS_METHODS = ('deepinversion', 'zskd')


def stage_key(config, stage: str):
  """The root key of a stage's (or a reporting stream's) random numbers."""
  return jax.random.fold_in(jax.random.key(config.seed), STAGE_KEYS[stage])


def init_key(config, network: str):
  """The key of a network's initial weights: 'teacher', 'generator' or 'student'."""
  return stage_key(config, f'{network}_init')


def samples_key(config):
  """The key of the noise behind samples.png (the same picture on every refresh)."""
  return stage_key(config, 'samples')


def build_networks(config, num_classes: int, channels: int, check_teacher: bool = True):
  """The run's (teacher, generator, student) modules, computing in `config.dtype`; a
  ConfigError when a classifier cannot take the run's image size (the teacher's unchecked
  when a Python module replaces it)."""
  config_checks.check_image_size(config, channels, check_teacher)
  dtype = models.DTYPES[config.dtype]
  teacher = models.create_classifier(config.teacher.model, num_classes, dtype,
                                     config.teacher.width)
  generator = models.Generator(image_size=config.image_size, channels=channels,
                               subpixel=config.generator.subpixel, dtype=dtype,
                               width=config.generator.width)
  student = models.create_classifier(config.student.model, num_classes, dtype,
                                     config.student.width)
  return teacher, generator, student


def _black(config):
  """A black pixel after normalisation, per channel: what shifted-in pixels take."""
  return tuple(float(v) for v in
               -np.asarray(config.mean, np.float32) / np.asarray(config.std, np.float32))


def teacher_setup(config, model, channels: int, images, labels):
  """The teacher's initial train state, its per-device step, its step count and
  `batches(step)`, the host batch of a step from the real train split (images, labels)."""
  batch = config.teacher.batch_size
  if len(images) < batch:
    raise ConfigError(
        f'config.teacher.batch_size={batch}: expected at most the {len(images)} train '
        f'examples of {config.dataset}')
  steps_per_epoch = len(images) // batch
  total = steps_per_epoch * config.teacher.epochs
  tx = train_steps.optimizer(config.teacher, total, steps_per_epoch)
  params, collections = train_steps.classifier_init(
      model, init_key(config, 'teacher'), (config.image_size, config.image_size, channels))
  state = train_steps.new_train_state(params, tx, **collections)

  fill = _black(config)

  def batches(step):
    """Epoch e visits the split in a permutation drawn from (seed, e); shifts and flips
    from the step."""
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(images))
    take = order[index * batch:(index + 1) * batch]
    rng = np.random.default_rng([config.seed, epoch, index])
    augmented = data.random_shift(rng, images[take], config.teacher.max_shift, fill)
    return data.random_flip(rng, augmented, config.teacher.flip), labels[take]

  step_fn = functools.partial(train_steps.teacher_step, model=model, tx=tx)
  return state, step_fn, total, batches


def generator_setup(config, generator, teacher):
  """The generator's initial train state and its per-device step (teacher frozen)."""
  gcfg = config.generator
  gen_vars = train_steps.init_variables(generator, init_key(config, 'generator'),
                                         jnp.zeros((2, gcfg.latent_dim)))
  tx = train_steps.optimizer(gcfg, gcfg.steps, gcfg.epoch_length)
  state = train_steps.new_train_state(gen_vars['params'], tx, batch_stats=gen_vars['batch_stats'],
                          loss_refs=jnp.zeros(2, jnp.float32))
  step_fn = functools.partial(train_steps.generator_step, generator=generator, teacher=teacher, tx=tx,
                              batch_size=gcfg.batch_size,
                              latent_dim=gcfg.latent_dim, epoch_length=gcfg.epoch_length,
                              bn_prior_weight=gcfg.bn_prior_weight)
  return state, step_fn


def _joint_state(config, channels: int, generator, student, tx_generator, tx_student):
  """The initial state of a joint method: generator and student train states."""
  gen_vars = train_steps.init_variables(generator, init_key(config, 'generator'),
                                         jnp.zeros((2, config.generator.latent_dim)))
  params, collections = train_steps.classifier_init(student, init_key(config, 'student'),
                                        (config.image_size, config.image_size, channels))
  return {'step': jnp.int32(0),
          'generator': train_steps.new_train_state(gen_vars['params'], tx_generator,
                                                   batch_stats=gen_vars['batch_stats']),
          'student': train_steps.new_train_state(params, tx_student, **collections),
          'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}}


def dafl_setup(config, channels: int, generator, teacher, student):
  """DAFL's joint initial state (generator and student train states) and its step."""
  dcfg, gcfg = config.dafl, config.generator
  tx_generator = optax.adam(dcfg.generator_learning_rate)
  tx_student = optax.adam(dcfg.student_learning_rate)
  state = _joint_state(config, channels, generator, student, tx_generator, tx_student)
  step_fn = functools.partial(
      train_steps.dafl_step, generator=generator, teacher=teacher, student=student,
      tx_generator=tx_generator, tx_student=tx_student, batch_size=dcfg.batch_size,
      latent_dim=gcfg.latent_dim, alpha=dcfg.alpha, beta=dcfg.beta,
      temperature=dcfg.temperature, bn_prior_weight=gcfg.bn_prior_weight)
  return state, step_fn


def dfad_setup(config, channels: int, generator, teacher, student):
  """DFAD's joint initial state (generator: Adam; student: SGD with momentum and L2, as
  the authors' DFAD_mnist.py) and its step."""
  dcfg, gcfg = config.dfad, config.generator
  tx_generator = optax.adam(dcfg.generator_learning_rate)
  tx_student = optax.sgd(dcfg.student_learning_rate, momentum=dcfg.momentum or None)
  if dcfg.weight_decay:
    tx_student = optax.chain(optax.add_decayed_weights(dcfg.weight_decay), tx_student)
  state = _joint_state(config, channels, generator, student, tx_generator, tx_student)
  step_fn = functools.partial(
      train_steps.dfad_step, generator=generator, teacher=teacher, student=student,
      tx_generator=tx_generator, tx_student=tx_student, batch_size=dcfg.batch_size,
      latent_dim=gcfg.latent_dim, student_updates=dcfg.student_updates)
  return state, step_fn


def joint_setup(config, channels: int, generator, teacher, student):
  """The initial state and step of a method in JOINT_METHODS."""
  setup = {'dafl': dafl_setup, 'dfad': dfad_setup}[config.method]
  return setup(config, channels, generator, teacher, student)


def synthesis_steps(config) -> int:
  """The steps of a synthesis method's stage: DeepInversion's synthesise and distil in
  each step; ZSKD's first synthesise every batch, then distil."""
  batches = config[config.method].steps
  return 2 * batches if config.method == 'zskd' else batches


def synthesis_frozen(config, teacher_vars, num_classes: int):
  """The frozen inputs of a synthesis method's step: the teacher, and for ZSKD its class
  similarity matrix (from the final layer's weights)."""
  frozen = {'teacher': teacher_vars}
  if config.method == 'zskd':
    kernel = models.final_kernel(teacher_vars['params'], num_classes)
    frozen['similarity'] = losses.class_similarity(jnp.asarray(kernel, jnp.float32))
  return frozen


def synthesis_setup(config, channels: int, num_classes: int, teacher, student):
  """The initial state of a method in SYNTHESIS_METHODS (an empty image bank for all its
  batches, the student's train state) and its step."""
  mcfg, scfg = config[config.method], config.student
  updates = scfg.steps // mcfg.steps
  params, collections = train_steps.classifier_init(student, init_key(config, 'student'),
                                        (config.image_size, config.image_size, channels))
  tx = train_steps.optimizer(scfg, scfg.steps, scfg.epoch_length)
  shape = (mcfg.batch_size, config.image_size, config.image_size, channels)
  dtype = jnp.promote_types(jnp.float32, models.DTYPES[config.dtype])
  state = {'step': jnp.int32(0),
           'bank': jnp.zeros((mcfg.steps * mcfg.batch_size, *shape[1:]), dtype),
           'student': train_steps.new_train_state(params, tx, **collections),
           'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}}
  kd = dict(teacher=teacher, student=student, tx_student=tx, shape=shape,
            student_updates=updates, student_batch_size=scfg.batch_size,
            temperature=scfg.temperature)
  if config.method == 'zskd':
    synthesis = {k: mcfg[k] for k in ('iterations', 'learning_rate', 'temperature')}
    step_fn = functools.partial(
        train_steps.zskd_step, batches=mcfg.steps,
        synthesis=dict(synthesis, betas=tuple(mcfg.betas), dtype=dtype),
        augmentation={'max_shift': mcfg.max_shift, 'flip': mcfg.flip,
                      'fill': _black(config)}, **kd)
    return state, step_fn
  synthesis = {k: mcfg[k] for k in ('iterations', 'learning_rate', 'jitter', 'class_weight',
                                    'tv_weight', 'l2_weight', 'bn_weight',
                                    'competition_weight', 'competition_temperature')}
  step_fn = functools.partial(train_steps.deepinversion_step, num_classes=num_classes,
                              synthesis=dict(synthesis, dtype=dtype), **kd)
  return state, step_fn


def bank_size(config) -> int:
  """Images in the student's bank: config.student.bank_size, 0: 16 batches; none when
  student.reuse is 1 (every step's batch fresh)."""
  scfg = config.student
  if scfg.reuse == 1:
    return 0
  return scfg.bank_size or 16 * scfg.batch_size


def student_setup(config, channels: int, generator, teacher, student):
  """The student's initial train state and its per-device step (generator and teacher
  frozen). With student.reuse > 1 the state holds the bank, empty until the runner
  builds it (`bank_rebuild`)."""
  scfg = config.student
  params, collections = train_steps.classifier_init(student, init_key(config, 'student'),
                                        (config.image_size, config.image_size, channels))
  tx = train_steps.optimizer(scfg, scfg.steps, scfg.epoch_length)
  state = train_steps.new_train_state(params, tx, **collections)
  common = dict(generator=generator, teacher=teacher, student=student, tx=tx,
                batch_size=scfg.batch_size, latent_dim=config.generator.latent_dim,
                temperature=scfg.temperature)
  if scfg.reuse == 1:
    return state, functools.partial(train_steps.student_step, **common,
                                    generator_batchnorm=scfg.generator_batchnorm)
  # The networks' outputs: float32 under bfloat16 compute too (models.py).
  size, dtype = bank_size(config), jnp.promote_types(jnp.float32, models.DTYPES[config.dtype])
  state['bank'] = {
      'images': jnp.zeros((size, config.image_size, config.image_size, channels), dtype),
      'logits': jnp.zeros((size, _classes(config, channels, student)), dtype)}
  return state, functools.partial(train_steps.bank_student_step, **common, reuse=scfg.reuse)


def _classes(config, channels: int, classifier) -> int:
  """The number of a classifier's logits, the teacher's too (traced, not run)."""
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, channels),
                               jnp.float32)
  variables = jax.eval_shape(classifier.init, jax.random.key(0), image)
  return jax.eval_shape(lambda v, x: classifier.apply(v, x, train=False)[0], variables,
                        image).shape[-1]


def bank_rebuild(config, generator, teacher):
  """What the student stage's runner rebuilds rather than checkpoints: (('bank',), the
  per-device train_steps.rebuild_bank), or None without a bank."""
  if config.student.reuse == 1:
    return None
  return ('bank',), functools.partial(
      train_steps.rebuild_bank, generator=generator, teacher=teacher,
      latent_dim=config.generator.latent_dim,
      fresh=config.student.batch_size // config.student.reuse)
