"""The networks of a run, the teacher's stage, and the keys of the run's random streams;
each method's own stages are set up in its module (`rdskd_jax/methods/`).
"""

import functools

import jax
import numpy as np

from rdskd_jax import config_checks, data, methods, models, train_steps
from rdskd_jax.errors import ConfigError


# Every random stream of a run is folded from the one root key, key(seed), by name: the
# stages' per-step noise, the reporting streams, and each network's initial weights. No two
# streams of one run share a key, and none equals a stream of another seed. A method's own
# stage takes its index from methods.STAGE_KEYS.
STAGE_KEYS = {'teacher': 0, 'generator': 1, 'student': 2, 'samples': 3, 'fidelity': 4,
              'diagnostics': 5, 'teacher_init': 7, 'generator_init': 8, 'student_init': 9}


def stage_key(config, stage: str):
  """The root key of a stage's (or a reporting stream's) random numbers."""
  index = STAGE_KEYS[stage] if stage in STAGE_KEYS else methods.STAGE_KEYS[stage]
  return jax.random.fold_in(jax.random.key(config.seed), index)


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


def black_pixel(config):
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

  fill = black_pixel(config)

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
