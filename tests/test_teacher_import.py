"""Teachers from outside: PyTorch state_dicts (fixtures written by
tests/data/teachers/make_fixtures.py), Flax modules from Python, and runs that read no
real data."""

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rdskd_jax import data, models, prepare, runs, teacher, train
from rdskd_jax.errors import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), 'data', 'teachers')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TORCH = importlib.util.find_spec('torch') is not None
NETWORKS = {  # Fixture name -> the Flax module it converts to.
    'lenet5': lambda: models.create_classifier('lenet5', 10),
    'wrn_16_1': lambda: models.create_classifier('wrn_16_1', 10),
    'resnet18_base8': lambda: models.CifarResNet(num_classes=10, base_width=8),
}


def fixture(name):
  return os.path.join(FIXTURES, f'{name}.safetensors')


def converted_logits(name, path=None):
  io = np.load(os.path.join(FIXTURES, f'{name}_io.npz'))
  module = NETWORKS[name]()
  variables = teacher.from_state_dict(module, teacher.read_state_dict(path or fixture(name)),
                                      io['images'].shape[1:])
  logits, _ = module.apply(variables, io['images'], train=False)
  return np.asarray(logits), io['logits']


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_converted_teachers_give_pytorchs_logits(name):
  ours, theirs = converted_logits(name)
  assert np.abs(theirs).max() > 1  # Logits of a few units: 1e-4 is a tight bound.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_pytorchs_flatten_order_is_converted_to_ours():
  """fc1 of a LeNet on larger images reads a C*H*W flatten in PyTorch, H*W*C here."""
  rng = np.random.default_rng(0)
  features = rng.standard_normal((3, 2, 2, 120)).astype(np.float32)  # NHWC
  weight = rng.standard_normal((84, 480)).astype(np.float32)          # PyTorch (out, in)
  theirs = features.transpose(0, 3, 1, 2).reshape(3, -1) @ weight.T
  ours = features.reshape(3, -1) @ teacher._flatten_chw_to_hwc(weight.T, 120)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def write_state(tmp_path, state, name='teacher.safetensors'):
  path = str(tmp_path / name)
  save_file(state, path)
  return path


def load_lenet(path, num_classes=10):
  return teacher.from_state_dict(models.create_classifier('lenet5', num_classes),
                                 teacher.read_state_dict(path), (32, 32, 1), what=path)


def test_bad_teacher_files_are_one_line_errors(tmp_path, monkeypatch):
  state = load_file(fixture('lenet5'))
  truncated = str(tmp_path / 'cut.safetensors')
  with open(fixture('lenet5'), 'rb') as f, open(truncated, 'wb') as g:
    g.write(f.read()[:5000])
  missing = write_state(tmp_path, {k: v for k, v in state.items() if k != 'fc1.bias'}, 'm.safetensors')
  extra = write_state(tmp_path, {**state, 'fc3.weight': state['fc2.weight']}, 'x.safetensors')
  cases = {
      truncated: 'not a readable safetensors file',
      missing: "missing key 'fc1.bias'",
      extra: "unexpected key 'fc3.weight'",
      fixture('wrn_16_1'): r"'conv1.weight' has shape \(16, 3, 3, 3\), expected \(6, 1, 5, 5\) "
                           r'for LeNet5 \(another architecture',
      str(tmp_path / 'none.safetensors'): 'no such file',
  }
  for path, expected in cases.items():
    with pytest.raises(ConfigError, match=expected) as error:
      load_lenet(path)
    assert '\n' not in str(error.value)
  with pytest.raises(ConfigError, match=r"'fc2.(weight|bias)' has shape \(10.*\), a teacher of "
                                        r'10 classes; the run has 100') as error:
    load_lenet(fixture('lenet5'), num_classes=100)
  half = models.create_classifier('lenet5_half', 10)
  with pytest.raises(ConfigError, match=r"'conv1.weight' has shape \(6, 1, 5, 5\), expected "
                                        r'\(3, 1, 5, 5\)'):
    teacher.from_state_dict(half, state, (32, 32, 1))
  monkeypatch.setitem(sys.modules, 'torch', None)  # As if torch were not installed.
  pth = str(tmp_path / 'teacher.pth')
  open(pth, 'wb').close()
  with pytest.raises(ConfigError, match='reading .pt/.pth needs torch, which is not installed; '
                                        'pip install torch, or convert it'):
    teacher.read_state_dict(pth)


def test_a_bad_teacher_file_ends_the_command_line_in_one_line(tmp_path):
  truncated = str(tmp_path / 'cut.safetensors')
  with open(fixture('lenet5'), 'rb') as f, open(truncated, 'wb') as g:
    g.write(f.read()[:5000])
  result = subprocess.run(
      [sys.executable, '-m', 'rdskd_jax.teacher', 'convert', truncated, '--model=lenet5',
       f'--out={tmp_path / "out"}'], capture_output=True, text=True, cwd=REPO,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'not a readable safetensors file' in errors[0]
  assert 'Traceback' not in result.stderr


def test_convert_writes_teacher_variables_and_reports_test_accuracy(tmp_path, capsys,
                                                                    mnist_data_dir):
  out = str(tmp_path / 'teacher_variables')
  assert teacher.main(['convert', fixture('lenet5'), '--model=lenet5', f'--out={out}',
                       '--dataset=mnist', f'--data_dir={mnist_data_dir}']) == 0
  printed = capsys.readouterr().out
  assert 'lenet5, 10 classes, 1 channels, 10 tensors' in printed
  accuracy = float(printed.split('test accuracy on mnist: ')[1].split()[0])
  assert 0 <= accuracy <= 1  # An untrained fixture: its accuracy is whatever it is.
  from configs import mnist
  config = mnist.get_config('smoke')
  config.teacher.checkpoint = out
  module = models.create_classifier('lenet5', 10)
  restored = teacher.restore_teacher(config, module, 1)
  direct = load_lenet(fixture('lenet5'))
  jax.tree.map(np.testing.assert_array_equal, restored, direct)
  with pytest.raises(SystemExit) as exit_:  # --out must be new.
    teacher.main(['convert', fixture('lenet5'), '--model=lenet5', f'--out={out}'])
  assert exit_.value.code == 2


@pytest.mark.skipif(not HAVE_TORCH, reason='needs torch (pip install torch) to write .pth files')
def test_pth_files_load_as_their_safetensors_and_full_widths_match_torch(tmp_path):
  import torch
  spec = importlib.util.spec_from_file_location('make_fixtures',
                                                os.path.join(FIXTURES, 'make_fixtures.py'))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  pth = str(tmp_path / 'wrn.pth')
  torch.save({k: torch.from_numpy(v) for k, v in load_file(fixture('wrn_16_1')).items()}, pth)
  ours, theirs = converted_logits('wrn_16_1', pth)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  # The registry's full-width networks, straight from torch modules.
  for name, build in (('resnet18', lambda: script.ResNet((2, 2, 2, 2), 64)),
                      ('wrn_40_2', lambda: script.WideResNet(40, 2))):
    torch.manual_seed(0)
    net = build()
    script.randomize_batchnorm(net, torch.Generator().manual_seed(1))
    net.eval()
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
      expected = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    path = str(tmp_path / f'{name}.pth')
    torch.save({'state_dict': net.state_dict()}, path)  # Wrapped, as training scripts save.
    module = models.create_classifier(name, 10)
    variables = teacher.from_state_dict(module, teacher.read_state_dict(path), (32, 32, 3))
    logits, _ = module.apply(variables, images, train=False)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0,
                               atol=1e-4 * max(1, np.abs(expected).max()))


def forbid_real_data(monkeypatch):
  """Any read of a dataset fails the test."""
  import tensorflow_datasets as tfds

  def refuse(*args, **kwargs):
    raise AssertionError(f'real data was read: {args} {kwargs}')
  for module, name in ((data, '_read_split'), (data, 'load_split'), (data, '_image_metadata'),
                       (data, '_arrays'), (data, 'ensure_prepared'),
                       (prepare, 'ensure_prepared'), (tfds, 'load'), (tfds, 'builder')):
    monkeypatch.setattr(module, name, refuse)


def no_data_config(**fields):
  from configs import mnist
  config = mnist.get_config('tiny')
  config.dataset, config.num_classes, config.channels = '', 10, 1
  config.data_dir = '/nonexistent'
  for field, value in fields.items():
    config[field] = value
  return config


def test_a_run_without_a_dataset_reads_no_real_data(tmp_path, monkeypatch):
  forbid_real_data(monkeypatch)
  config = no_data_config(figures=True)
  config.teacher.checkpoint = fixture('lenet5')
  report = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'test_accuracy' not in report['teacher'] and 'test_accuracy' not in report['student']
  assert 0 <= report['student']['generated_agreement'] <= 1
  assert report['diagnostics']['samples'] > 0 and 'frechet_distance' not in report['diagnostics']
  assert report['teacher']['fingerprint'] == teacher.fingerprint(load_lenet(fixture('lenet5')))
  assert os.path.exists(tmp_path / 'run' / 'samples.png')
  assert not os.path.exists(tmp_path / 'run' / 'normalization.json')


def test_an_outside_teacher_reads_only_the_test_split(tmp_path, monkeypatch, tiny_config):
  splits = []
  read = data._read_split
  monkeypatch.setattr(data, '_read_split', lambda c, split: splits.append(split) or read(c, split))
  tiny_config.teacher.checkpoint = fixture('lenet5')
  report = train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert splits and all(s.startswith('test') for s in splits), splits
  assert 0 <= report['teacher']['test_accuracy'] <= 1
  tiny_config.mean = tiny_config.std = ()
  with pytest.raises(ConfigError, match='a teacher from outside reads no train split'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'other'))


class TinyTeacher(nn.Module):
  """A teacher outside the registry: one conv, a pool, a dense layer."""

  @nn.compact
  def __call__(self, images, train=False):
    x = nn.relu(nn.Conv(8, (3, 3), strides=(4, 4))(images))
    features = jnp.mean(x, axis=(1, 2))
    return nn.Dense(10)(features), features


def test_a_flax_module_teacher_from_python(tmp_path, monkeypatch):
  forbid_real_data(monkeypatch)
  module = TinyTeacher()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  config = no_data_config()
  report = train.train_and_evaluate(config, str(tmp_path / 'run'), teacher=(module, variables))
  assert report['teacher']['source'] == 'python (TinyTeacher)'
  assert 0 <= report['student']['generated_agreement'] <= 1
  other = module.init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ConfigError, match='was run with another teacher'):
    train.train_and_evaluate(config, str(tmp_path / 'run'), teacher=(module, other))
  # Plots and notebooks restore such a run given its teacher again, and only that one.
  run = runs.load_run(str(tmp_path / 'run'), teacher=(module, variables))
  assert run.teacher is module and run.student_vars is not None
  assert teacher.fingerprint(run.teacher_vars) == report['teacher']['fingerprint']
  with pytest.raises(ConfigError, match=r'a teacher given from Python \(python \(TinyTeacher\)\)'):
    runs.load_run(str(tmp_path / 'run'))
  with pytest.raises(ConfigError, match='was run with another teacher'):
    runs.load_run(str(tmp_path / 'run'), teacher=(module, other))

  class LogitsOnly(nn.Module):
    @nn.compact
    def __call__(self, images, train=False):
      return nn.Dense(10)(images.reshape(len(images), -1))
  bad = LogitsOnly()
  with pytest.raises(ConfigError, match=r'returned shapes .* expected \(logits \(N, 10\)'):
    train.train_and_evaluate(config, str(tmp_path / 'bad'),
                             teacher=(bad, bad.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))))
  with pytest.raises(ConfigError, match="config.dataset='': expected a trained teacher"):
    train.train_and_evaluate(config, str(tmp_path / 'none'))


@pytest.mark.parametrize('field,value,expected', [
    ('num_classes', 0, "config.num_classes=0: expected a positive number when config.dataset is ''"),
    ('mean', (0.5, 0.5), "config.mean=.*: expected one value per channel"),
])
def test_a_config_without_a_dataset_says_what_it_lacks(field, value, expected):
  from rdskd_jax import config_checks
  config = no_data_config(**{field: value})
  with pytest.raises(ConfigError, match=expected):
    config_checks.validate(config, 1)
