"""Config presets load and validate; bad values and unknown fields are one-line errors."""

import os
import subprocess
import sys

import pytest

from configs import mnist
from rdskd_jax import config_checks, config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('preset', ['paper', 'cpu', 'smoke', 'tiny'])
def test_presets_load_and_validate(preset):
  config = mnist.get_config(preset)
  config_checks.validate(config)
  assert config.preset == preset


def test_paper_preset_has_the_authors_settings():
  c = mnist.get_config()
  assert (c.generator.batch_size, c.generator.steps, c.generator.epoch_length) == (512, 2400, 120)
  assert (c.generator.learning_rate, c.student.learning_rate) == (1e-3, 2e-3)
  assert (c.student.batch_size, c.student.steps, c.student.temperature) == (512, 120000, 10.0)
  assert (c.teacher.model, c.student.model, c.generator.latent_dim) == ('lenet5', 'lenet5_half', 100)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'fast'"):
    mnist.get_config('fast')


@pytest.mark.parametrize('field, value, message', [
    ('generator.batch_size', 15, 'config.generator.batch_size=15: expected an even number'),
    ('student.steps', 0, 'config.student.steps=0: expected a positive integer'),
    ('generator.learning_rate', -1.0, 'config.generator.learning_rate=-1.0: expected a positive'),
    ('parallel', 'tpu', "config.parallel='tpu': expected 'pmap' or 'shard_map' or 'none'"),
    ('dtype', 'float16', "config.dtype='float16': expected 'float32' or 'bfloat16'"),
    ('dtype', 'float64', "config.dtype='float64': expected .* float64 needs JAX_ENABLE_X64=1"),
    ('student.model', 'resnet', "config.student.model='resnet': expected one of lenet5"),
    ('student.generator_batchnorm', 'eval',
     "config.student.generator_batchnorm='eval': expected 'running' or 'batch'"),
    ('method', 'cmi',
     "config.method='cmi': expected 'rdskd', 'dafl', 'dfad', 'deepinversion', 'zskd', 'mskd'"),
    ('deepinversion.jitter', -1, 'config.deepinversion.jitter=-1: expected a value >= 0'),
    ('zskd.betas', (), 'config.zskd.betas=.*: expected one or more positive Dirichlet'),
    ('dfad.student_updates', 0, 'config.dfad.student_updates=0: expected a positive integer'),
    ('dfad.weight_decay', -1e-4, 'config.dfad.weight_decay=-0.0001: expected a value >= 0'),
    ('generator.width', 0.0, 'config.generator.width=0.0: expected a positive number'),
    ('student.width', -0.5, 'config.student.width=-0.5: expected a positive number'),
    ('test_examples', -1, 'config.test_examples=-1: expected 0 .all. or a positive count'),
    ('test_split', 'test[10%:]', r"config.test_split='test\[10%:\]': expected a split 'NAME'"),
    ('test_split', 'train[9:9]', r"config.test_split='train\[9:9\]': expected a split 'NAME'"),
])
def test_bad_values_are_named(field, value, message):
  config = mnist.get_config('smoke')
  parent, _, name = field.rpartition('.')
  (config[parent] if parent else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
    config_checks.validate(config)


def test_a_validation_slice_must_be_train_data_the_teacher_does_not_see():
  config = mnist.get_config('smoke')
  config.test_split = 'train[50000:]'
  message = (r"config.test_split='train\[50000:\]': expected a slice of the train split after "
             r"the teacher's examples: teacher.max_train_examples={} must be positive and at "
             'most 50000')
  for examples in (0, 50001):  # The whole split, or one image too many.
    config.teacher.max_train_examples = examples
    with pytest.raises(config_lib.ConfigError, match=message.format(examples)):
      config_checks.validate(config)
  config.teacher.max_train_examples = 50000
  config_checks.validate(config)
  config.test_split, config.teacher.max_train_examples = 'train[:100]', 0
  config.teacher.checkpoint = '/a/teacher/trained/elsewhere'  # Its data is not ours to check.
  config_checks.validate(config)


@pytest.mark.parametrize('fields, devices, message', [
    ({'student.reuse': 0}, 1, 'config.student.reuse=0: expected 1 .every image fresh. or more'),
    ({'student.reuse': 3}, 1, 'config.student.reuse=3: expected a divisor of '
     'student.batch_size=16'),
    ({'student.reuse': 8}, 4, 'config.student.reuse=8: expected a value leaving '
     'student.batch_size/reuse=2 fresh images a step divisible among the 4 devices'),
    ({'student.reuse': 4, 'student.bank_size': 8}, 1,
     'config.student.bank_size=8: expected at least a batch, student.batch_size=16'),
    ({'student.reuse': 4, 'student.bank_size': 18}, 1,
     'config.student.bank_size=18: expected a multiple of the 4 fresh images of a step'),
    ({'student.reuse': 2, 'student.generator_batchnorm': 'batch'}, 1,
     "config.student.generator_batchnorm='batch': expected 'running' with student.reuse > 1"),
    ({'generator.checkpoint': '/g', 'method': 'zskd'}, 1,
     "config.generator.checkpoint='/g': expected '' with method 'zskd'"),
])
def test_bad_bank_values_are_named(fields, devices, message):
  """The bank's settings against the batch, the devices and the method: one line each."""
  config = mnist.get_config('smoke')
  for field, value in fields.items():
    parent, _, name = field.rpartition('.')
    (config[parent] if parent else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
    config_checks.validate(config, devices)
  config_checks.validate(mnist.get_config('smoke'), devices)  # The settings it changes pass.


def test_dfad_takes_no_batchnorm_prior():
  config = mnist.get_config('smoke')
  config.method, config.generator.bn_prior_weight = 'dfad', 0.1
  with pytest.raises(config_lib.ConfigError, match="bn_prior_weight=0.1: expected 0 with method 'dfad'"):
    config_checks.validate(config)
  config.method = 'dafl'
  config_checks.validate(config)




def test_batch_not_divisible_by_devices_names_both_numbers():
  config = mnist.get_config('smoke')
  config.generator.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=12: .*2 x 8 devices'):
    config_checks.validate(config, available_devices=8)
  config.num_devices = 2  # 12 = 2 x 2 x 3: fine on two of the eight.
  config_checks.validate(config, available_devices=8)


def test_more_devices_than_exist_is_an_error():
  config = mnist.get_config('smoke')
  config.num_devices = 16
  with pytest.raises(config_lib.ConfigError,
                     match='config.num_devices=16: expected at most the 8 devices there are'):
    config_checks.validate(config, available_devices=8)


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'rdskd_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_unknown_field_is_one_line_error(tmp_path):
  result = _main('--config=configs/mnist.py:smoke', f'--workdir={tmp_path}',
                 '--config.generator.bath_size=8')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: bad command line: unknown config field bath_size']


def test_cli_missing_config_file_is_one_line_error(tmp_path):
  result = _main('--config=configs/nope.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  assert 'No such file or directory' in result.stderr and 'configs/nope.py' in result.stderr


def test_cli_bad_value_is_one_line_error(tmp_path):
  result = _main('--config=configs/mnist.py:smoke', f'--workdir={tmp_path}',
                 '--config.student.steps=-3')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == \
      'error: config.student.steps=-3: expected a positive integer'
  assert 'Traceback' not in result.stderr


def test_reading_a_config_file_imports_no_jax():
  """Config files import config_lib alone: reading one is fast (checks live in
  config_checks, which needs JAX)."""
  code = ('import sys; from configs import cifar10, mnist, svhn, tfds; '
          "[m.get_config(p) for m in (cifar10, mnist, svhn) for p in ('paper', 'cpu', 'smoke')]; "
          "print(sorted(n for n in ('jax', 'flax', 'tensorflow') if n in sys.modules))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'svhn', 'tfds'])
def test_a_config_file_loads_by_path_from_any_directory(tmp_path, name):
  """The shared presets load beside the config file, not through `import configs`, so an
  absolute --config path works from a directory where `configs` is no package."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  code = ('from absl import flags; from ml_collections import config_flags; '
          "c = config_flags.DEFINE_config_file('config'); "
          f"flags.FLAGS(['x', '--config={path}:smoke']); "
          'print(c.value.preset, c.value.generator.steps)')
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['smoke', '6']
