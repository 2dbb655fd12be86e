"""Config checks: every bad value is a one-line `ConfigError` naming the field and value."""

import math
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rdskd_jax import data, methods, models, parallel
from rdskd_jax.errors import ConfigError

OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('constant', 'cosine', 'step')


def require(ok: bool, field: str, value, expected: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: expected {expected}')


def positive_int(config, field):
  value = _get(config, field)
  require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          field, value, 'a positive integer')


def positive_float(config, field):
  value = _get(config, field)
  require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
          field, value, 'a positive number')


def _check_test_split(config):
  """The test split, or a slice of the train split that the teacher stage does not read."""
  split = config.test_split
  parsed = data.split_range(split) if isinstance(split, str) else None
  require(parsed is not None and (parsed[2] is None or parsed[2] > parsed[1]), 'test_split',
          split, "a split 'NAME' or a slice 'NAME[N:]', 'NAME[:M]' or 'NAME[N:M]'")
  name, start, _ = parsed
  if name != 'train' or config.teacher.checkpoint or not config.dataset:
    return
  held_out = 0 < config.teacher.max_train_examples <= start
  require(held_out, 'test_split', split,
          'a slice of the train split after the teacher\'s examples: teacher.max_train_examples'
          f'={config.teacher.max_train_examples} must be positive and at most {start}')


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


def non_negative(config, field):
  value = _get(config, field)
  require(value >= 0, field, value, 'a value >= 0')


def generated_batch(config, block: str, num_devices: int) -> None:
  """A batch of generated samples (`<block>.batch_size`): even, for the diversity loss's
  two halves, and each half divisible among the devices."""
  batch = config[block].batch_size
  require(batch % 2 == 0, f'{block}.batch_size', batch,
          'an even number (the diversity loss pairs two halves)')
  require(batch % (2 * num_devices) == 0, f'{block}.batch_size', batch,
          f'a multiple of 2 x {num_devices} devices (each device holds a slice of both halves)')


def pixel_shift(config, block: str) -> None:
  """`<block>.max_shift`, an augmentation by translation."""
  shift = config[block].max_shift
  require(isinstance(shift, int) and not isinstance(shift, bool) and 0 <= shift and
          (config.image_size == 0 or shift < config.image_size // 2), f'{block}.max_shift',
          shift, 'a shift in whole pixels, 0 <= shift < image_size / 2')


def _non_finite_field(tree, prefix=''):
  """The first field (dotted name, value) holding an infinite or NaN number, or None."""
  for name, value in tree.items():
    field = f'{prefix}{name}'
    if isinstance(value, dict):
      found = _non_finite_field(value, f'{field}.')
      if found:
        return found
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      return field, value
  return None


def _takes_images(model: str, size: int, channels: int) -> bool:
  """Whether classifier `model` can take size x size images (traced, not run)."""
  network = models.create_classifier(model, 10)
  try:
    with warnings.catch_warnings(), np.errstate(divide='ignore'):
      warnings.simplefilter('ignore')
      jax.eval_shape(lambda: network.init(jax.random.key(0),
                                          jnp.zeros((1, size, size, channels))))
    return True
  except Exception:  # Shape errors of any kind: a too small image leaves nothing to convolve.
    return False


def check_image_size(config, channels: int, check_teacher: bool = True) -> None:
  """Raises ConfigError when the teacher or the student cannot take the run's images,
  naming the smallest size (a multiple of 4, as the generator needs) that works."""
  size = config.image_size
  for stage in ('teacher', 'student')[0 if check_teacher else 1:]:
    model = config[stage].model
    if not _takes_images(model, size, channels):
      smallest = next((s for s in range(4, 513, 4) if _takes_images(model, s, channels)), None)
      raise ConfigError(
          f'config.image_size={size}: expected at least {smallest} for {stage} {model!r} '
          f'({size}x{size} images leave it nothing to convolve)')


def devices_used(config, available_devices: int) -> int:
  """How many devices a run of `config` uses when `available_devices` exist."""
  if config.parallel == 'none':
    return 1
  return config.num_devices or available_devices


def validate(config: ml_collections.ConfigDict, available_devices: int = 1) -> None:
  """Raises ConfigError on the first value the pipeline cannot run with, on a machine (or
  multi-process run) with `available_devices` devices."""
  found = _non_finite_field(config.to_dict())
  if found:
    raise ConfigError(f'config.{found[0]}={found[1]!r}: expected a finite number')
  require(isinstance(config.dataset, str), 'dataset', config.dataset,
          "a tfds dataset name, or '' (none)")
  if not config.dataset:  # Everything a dataset would have said comes from the config.
    require(config.num_classes or config.channels, 'dataset', config.dataset,
            "a tfds dataset name, or '' with config.num_classes and config.channels set "
            '(a run that reads no data, with a teacher from outside)')
    for field in ('num_classes', 'channels', 'image_size'):
      require(isinstance(config[field], int) and config[field] > 0, field, config[field],
              "a positive number when config.dataset is ''")
    require(len(config.mean) == config.channels, 'mean', config.mean,
            f"one value per channel ({config.channels}) when config.dataset is ''")
  else:
    for field in ('num_classes', 'channels'):
      require(isinstance(config[field], int) and config[field] >= 0, field, config[field],
              "0 (the dataset's) or the dataset's value")
  require(config.method in methods.METHODS, 'method', config.method,
          ', '.join(map(repr, methods.METHODS)))
  require(config.generator.bn_prior_weight >= 0, 'generator.bn_prior_weight',
          config.generator.bn_prior_weight, 'a weight >= 0')
  require(config.parallel in parallel.MODES, 'parallel', config.parallel,
          ' or '.join(repr(m) for m in parallel.MODES))
  require(config.dtype in models.DTYPES, 'dtype', config.dtype,
          "'float32' or 'bfloat16' ('float64' with JAX_ENABLE_X64=1)")
  require(config.dtype != 'float64' or jax.config.jax_enable_x64, 'dtype', config.dtype,
          "'float32' or 'bfloat16': float64 needs JAX_ENABLE_X64=1")
  require(isinstance(config.image_size, int) and config.image_size >= 0, 'image_size',
          config.image_size, "a size in pixels, or 0 (the dataset's)")
  for field in ('checkpoint_every', 'max_bad_steps', 'log_every',
                'eval_batch_size', 'teacher.batch_size', 'teacher.epochs', 'generator.latent_dim',
                'generator.batch_size', 'generator.steps', 'generator.epoch_length',
                'student.batch_size', 'student.steps', 'student.agreement_samples',
                'diagnostic_samples'):
    positive_int(config, field)
  for field in ('teacher.width', 'generator.width', 'student.width',
                'teacher.learning_rate', 'generator.learning_rate',
                'student.learning_rate', 'student.temperature', 'student.epoch_length'):
    positive_float(config, field)
  require(config.image_size % 4 == 0, 'image_size', config.image_size,
          'a multiple of 4 (the generator upsamples twice), or 0')
  require(len(config.mean) == len(config.std) and all(s > 0 for s in config.std),
          'std', config.std, 'positive values, one per channel of mean (or both empty)')
  for stage in ('teacher', 'student'):
    model = config[stage].model
    require(model in models.known_classifiers(), f'{stage}.model', model,
            'one of ' + ', '.join(models.known_classifiers()))
  for stage in ('teacher', 'generator', 'student'):
    cfg = config[stage]
    require(cfg.optimizer in OPTIMIZERS, f'{stage}.optimizer', cfg.optimizer,
            ' or '.join(map(repr, OPTIMIZERS)))
    require(cfg.schedule in SCHEDULES, f'{stage}.schedule', cfg.schedule,
            ' or '.join(map(repr, SCHEDULES)))
    require(all(isinstance(e, int) and e > 0 for e in cfg.decay_epochs) and
            list(cfg.decay_epochs) == sorted(cfg.decay_epochs), f'{stage}.decay_epochs',
            cfg.decay_epochs, 'increasing positive epoch numbers')
    require(cfg.weight_decay >= 0 and 0 <= cfg.momentum < 1, f'{stage}.weight_decay',
            (cfg.weight_decay, cfg.momentum), 'weight_decay >= 0 and 0 <= momentum < 1')
  require(config.student.generator_batchnorm in models.GENERATOR_BATCHNORM,
          'student.generator_batchnorm', config.student.generator_batchnorm,
          ' or '.join(map(repr, models.GENERATOR_BATCHNORM)))
  pixel_shift(config, 'teacher')
  require(isinstance(config.num_devices, int) and config.num_devices >= 0, 'num_devices',
          config.num_devices, '0 (all devices) or a positive device count')
  require(config.num_devices <= available_devices, 'num_devices', config.num_devices,
          f'at most the {available_devices} devices there are')
  num_devices = devices_used(config, available_devices)
  require(isinstance(config.steps_per_call, int) and config.steps_per_call >= 0,
          'steps_per_call', config.steps_per_call,
          "0 (the platform's default) or a positive step count")
  require(config.image_every >= 0, 'image_every', config.image_every,
          '0 (never) or a positive step count')
  require(config.student.eval_every >= 0, 'student.eval_every', config.student.eval_every,
          '0 (never) or a positive step count')
  for field in ('teacher.max_train_examples', 'test_examples'):
    require(isinstance(_get(config, field), int) and _get(config, field) >= 0, field,
            _get(config, field), '0 (all) or a positive count')
  _check_test_split(config)
  for block in ('generator', 'student'):
    generated_batch(config, block, num_devices)
  _check_reused_samples(config)
  for name in methods.METHODS:  # Each block's values, and the running method's needs.
    methods.get(name).check(config, num_devices)
  require(config.teacher.batch_size % num_devices == 0, 'teacher.batch_size',
          config.teacher.batch_size, f'a multiple of the {num_devices} devices')


def _check_reused_samples(config) -> None:
  """The fields of the sample bank and of a reused generator, whose values every config
  must hold; whether they apply is the method's to check."""
  scfg = config.student
  require(isinstance(scfg.reuse, int) and not isinstance(scfg.reuse, bool) and
          scfg.reuse >= 1, 'student.reuse', scfg.reuse,
          '1 (every image fresh) or more uses of each image')
  require(isinstance(scfg.bank_size, int) and not isinstance(scfg.bank_size, bool) and
          scfg.bank_size >= 0, 'student.bank_size', scfg.bank_size,
          '0 (16 batches) or a count of images')
  given = config.generator.checkpoint
  require(isinstance(given, str), 'generator.checkpoint', given,
          "a generator_variables directory, or '' (train one)")
  method = methods.get(config.method)
  require(not given or getattr(method, 'READS_GENERATOR_CHECKPOINT', False),
          'generator.checkpoint', given,
          f"'' with method {config.method!r}, which trains its own generator or none")
