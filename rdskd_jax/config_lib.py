"""Config checks: every bad value is a one-line `ConfigError` naming the field and value."""

import jax
import ml_collections

from rdskd_jax import models, parallel


class ConfigError(ValueError):
  """A config value that cannot run; the message names the field, value and expectation."""


def _require(ok: bool, field: str, value, expected: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: expected {expected}')


def _positive_int(config, field):
  value = _get(config, field)
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           field, value, 'a positive integer')


def _positive_float(config, field):
  value = _get(config, field)
  _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
           field, value, 'a positive number')


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


def devices_used(config, available_devices: int) -> int:
  """How many devices a run of `config` uses when `available_devices` exist."""
  if config.parallel == 'none':
    return 1
  return config.num_devices or available_devices


def validate(config: ml_collections.ConfigDict, available_devices: int = 1) -> None:
  """Raises ConfigError on the first value the pipeline cannot run with, on a machine (or
  multi-process run) with `available_devices` devices."""
  _require(isinstance(config.dataset, str) and config.dataset, 'dataset', config.dataset,
           'a tfds dataset name')
  _require(config.parallel in parallel.MODES, 'parallel', config.parallel,
           ' or '.join(repr(m) for m in parallel.MODES))
  _require(config.dtype in models.DTYPES, 'dtype', config.dtype,
           "'float32' or 'bfloat16' ('float64' with JAX_ENABLE_X64=1)")
  _require(config.dtype != 'float64' or jax.config.jax_enable_x64, 'dtype', config.dtype,
           "'float32' or 'bfloat16': float64 needs JAX_ENABLE_X64=1")
  for field in ('image_size', 'checkpoint_every', 'max_bad_steps', 'log_every',
                'eval_batch_size', 'teacher.batch_size', 'teacher.epochs', 'generator.latent_dim',
                'generator.batch_size', 'generator.steps', 'generator.epoch_length',
                'student.batch_size', 'student.steps', 'student.agreement_samples'):
    _positive_int(config, field)
  for field in ('teacher.learning_rate', 'generator.learning_rate',
                'student.learning_rate', 'student.temperature'):
    _positive_float(config, field)
  _require(config.image_size % 4 == 0, 'image_size', config.image_size,
           'a multiple of 4 (the generator upsamples twice)')
  _require(len(config.mean) == len(config.std) and all(s > 0 for s in config.std),
           'std', config.std, 'positive values, one per channel of mean')
  for stage in ('teacher', 'student'):
    model = config[stage].model
    _require(model in models.known_classifiers(), f'{stage}.model', model,
             'one of ' + ', '.join(models.known_classifiers()))
    _require(config[stage].schedule in ('constant', 'cosine'), f'{stage}.schedule',
             config[stage].schedule, "'constant' or 'cosine'")
  _require(0 <= config.teacher.max_shift < config.image_size // 2, 'teacher.max_shift',
           config.teacher.max_shift, 'a shift in pixels, 0 <= shift < image_size / 2')
  _require(isinstance(config.num_devices, int) and config.num_devices >= 0, 'num_devices',
           config.num_devices, '0 (all devices) or a positive device count')
  _require(config.num_devices <= available_devices, 'num_devices', config.num_devices,
           f'at most the {available_devices} devices there are')
  num_devices = devices_used(config, available_devices)
  _require(config.student.eval_every >= 0, 'student.eval_every', config.student.eval_every,
           '0 (never) or a positive step count')
  _require(config.teacher.max_train_examples >= 0, 'teacher.max_train_examples',
           config.teacher.max_train_examples, '0 (all) or a positive count')
  for stage in ('generator', 'student'):
    batch = config[stage].batch_size
    _require(batch % 2 == 0, f'{stage}.batch_size', batch,
             'an even number (the diversity loss pairs two halves)')
    _require(batch % (2 * num_devices) == 0, f'{stage}.batch_size', batch,
             f'a multiple of 2 x {num_devices} devices (each device holds a slice of both halves)')
  _require(config.teacher.batch_size % num_devices == 0, 'teacher.batch_size',
           config.teacher.batch_size, f'a multiple of the {num_devices} devices')
