"""Other datasets than MNIST, end to end on tfds mock data (random images of the real
dataset's shapes and class counts, from tfds.testing.mock_data): the SVHN and CIFAR-10
configs' tiny presets (on WRN-10-1; their deep networks' steps are compiled in
tests/test_models.py), another 1-channel dataset through the MNIST config, and the
generic config reading everything from the dataset's metadata."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar10, mnist, svhn
from configs import tfds as tfds_config
from rdskd_jax import config_checks, config_lib, data, train, train_steps


@pytest.fixture
def mock_tfds(request, monkeypatch):
  """tfds with fake data: 64 examples per split (`@pytest.mark.parametrize('mock_tfds',
  [N], indirect=True)` for N). Mocked builders report themselves unprepared, so our
  download-or-build step is skipped (it is tested on real MNIST)."""
  monkeypatch.setattr(data, 'ensure_prepared', lambda name, data_dir: None)
  with tfds.testing.mock_data(num_examples=getattr(request, 'param', 64)):
    yield


def _run(config, workdir, figures=False):
  """The run of `config` on mock data, with its report checked; samples.png drawn and
  checked where `figures` (the tiny presets draw none)."""
  config.data_dir = '/nonexistent/tfds'  # mock_data never reads it.
  config.figures = figures
  report = train.train_and_evaluate(config, str(workdir))
  assert json.load(open(os.path.join(workdir, 'report.json')))['student'] == report['student']
  assert report['teacher']['steps'] > 0
  if 'images' in report.get(config.method, {}):  # No generator: a synthesised set.
    assert 'generator' not in report
  else:
    assert report['generator']['steps'] == config.generator.steps
  assert 0.0 <= report['student']['test_accuracy'] <= 1.0
  assert 0.0 <= report['teacher']['test_accuracy'] <= 1.0
  assert not figures or os.path.getsize(os.path.join(workdir, 'samples.png')) > 1000
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert all(np.isfinite(v) for r in rows for k, v in r.items() if k not in ('stage', 'step'))
  return report


# The methods on the deep configs run the small BatchNorm pair WRN-10-1 -> WRN-10-1: the
# code paths of WRN-40-2 -> WRN-16-1 and ResNet-34 -> ResNet-18, whose steps take most of
# a run's time to compile and are compiled once each by
# tests/test_models.py::test_the_deep_configs_networks_take_a_compiled_step_of_each_stage.
BATCHNORM_PAIR = 'wrn_10_1'


def test_svhn_tiny_preset_end_to_end_with_the_batchnorm_prior(mock_tfds, tmp_path):
  """SVHN's config (RGB, latent 1000) end to end with RDSKD, the BatchNorm prior weighted,
  on one device (the BatchNorm networks' data-parallel path is run by the generic config's
  test below), samples.png drawn in colour. CIFAR-10's config runs end to end in the
  method tests below."""
  config = svhn.get_config('tiny')
  assert (config.dataset, config.teacher.model, config.student.model) == (
      'svhn_cropped', 'wrn_40_2', 'wrn_16_1')
  assert config.generator.latent_dim == 1000
  config.teacher.model = config.student.model = BATCHNORM_PAIR
  config.generator.bn_prior_weight = 0.1
  config.parallel = 'none'
  report = _run(config, tmp_path, figures=True)
  fields = report['dataset_fields']
  assert (fields['num_classes'], fields['channels']) == (10, 3)
  assert fields['read_from'].startswith('tfds data_dir ')
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  with_prior = [r['bn_prior'] for r in rows if 'bn_prior' in r]
  assert len(with_prior) == 4 and all(v > 0 for v in with_prior)
  # Teacher and student have BatchNorm: their running statistics are saved and used.
  assert os.listdir(os.path.join(tmp_path, 'teacher_variables'))


def test_dfad_on_cifar10(mock_tfds, tmp_path):
  """DFAD with BatchNorm networks, whose generator and student both train in BatchNorm's
  training mode, on CIFAR-10's config (RGB, latent 1000)."""
  config = cifar10.get_config('tiny')
  assert (config.dataset, config.teacher.model, config.student.model,
          config.generator.latent_dim) == ('cifar10', 'resnet34', 'resnet18', 1000)
  config.method = 'dfad'
  config.teacher.model = config.student.model = BATCHNORM_PAIR
  report = _run(config, tmp_path)
  assert report['dfad']['steps'] == config.dfad.steps
  assert report['config']['dfad']['student_learning_rate'] == 0.1  # DFAD_cifar.py's.
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  assert any('student_l1' in r for r in rows if r['stage'] == 'dfad')


@pytest.mark.parametrize('method', ['deepinversion', 'zskd'])
def test_synthesis_methods_on_cifar10(mock_tfds, tmp_path, method):
  """DeepInversion with a BatchNorm teacher, its BatchNorm prior weighted (10, the
  authors' CIFAR-10 value); ZSKD's class similarity from the teacher's final layer; both
  training a BatchNorm student on their synthesised set, drawn as a class grid of RGB
  images (DeepInversion's)."""
  config = cifar10.get_config('tiny')
  config.method = method
  config.teacher.model = config.student.model = BATCHNORM_PAIR
  report = _run(config, tmp_path, figures=method == 'deepinversion')
  assert report[method]['images'] == config[method].steps * config[method].batch_size
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  logged = [r for r in rows if r['stage'] == method]
  if method == 'deepinversion':
    assert report['config']['deepinversion']['bn_weight'] == 10.0
    assert all(r['bn_prior'] > 0 for r in logged)
  else:
    assert logged[0]['impression'] > 0 and logged[-1]['kd'] > 0


def test_mnist_config_runs_another_one_channel_dataset(mock_tfds, tmp_path):
  config = mnist.get_config('tiny')
  config.dataset = 'fashion_mnist'
  report = _run(config, tmp_path)
  assert report['dataset'] == 'fashion_mnist'
  fields = report['dataset_fields']
  assert (fields['num_classes'], fields['channels']) == (10, 1)
  assert fields['read_from'].startswith('tfds data_dir ')


def test_generic_config_reads_shape_and_computes_normalization(mock_tfds, tmp_path):
  config = tfds_config.get_config('tiny')
  config.dataset = 'fashion_mnist'      # 28x28x1, 10 classes in its metadata.
  config.teacher.model = config.student.model = 'wrn_10_1'  # Small, for test time.
  report = _run(config, tmp_path)
  assert report['config']['image_size'] == 28
  assert report['dataset_fields']['image_size'] == '28 (from the dataset)'
  stats = json.load(open(os.path.join(tmp_path, 'normalization.json')))
  assert stats['dataset'] == 'fashion_mnist' and len(stats['mean']) == len(stats['std']) == 1
  # Mock pixels are uniform on 0..255: mean ~0.5, std ~0.29 after scaling to [0, 1].
  assert abs(stats['mean'][0] - 0.5) < 0.05 and abs(stats['std'][0] - 0.29) < 0.05
  assert list(report['config']['mean']) == stats['mean']


def test_generic_config_refuses_a_channel_count_mismatch(mock_tfds, tmp_path):
  config = tfds_config.get_config('smoke')
  config.dataset = 'cifar10'
  config.mean, config.std = (0.5,), (0.25,)
  with pytest.raises(data.DataError, match=r"config.mean=\(0.5,\): 1 values, but dataset "
                                           r"'cifar10' has 3 channels"):
    data.resolve_dataset_fields(config, str(tmp_path))


def test_generic_config_needs_a_dataset_name():
  with pytest.raises(config_lib.ConfigError, match="config.dataset='': expected a tfds"):
    config_checks.validate(tfds_config.get_config('smoke'), 1)


def test_step_schedule_multiplies_the_learning_rate_after_its_epochs():
  config = cifar10.get_config()
  scfg = config.student
  assert scfg.schedule == 'step' and tuple(scfg.decay_epochs) == (800,)
  scfg.optimizer, scfg.momentum = 'sgd', 0.0  # Plain SGD: the update is -lr * gradient.
  scfg.epoch_length = 1  # Epochs of one step: the same schedule, 120x fewer updates to run.
  tx = train_steps.optimizer(scfg, scfg.steps, scfg.epoch_length)
  params = {'w': np.zeros(())}
  state = tx.init(params)
  lrs = []
  for step in range(802):
    updates, state = tx.update({'w': np.ones(())}, state, params)
    if step in (0, 799, 800, 801):
      lrs.append(-float(updates['w']))
  np.testing.assert_allclose(lrs, [2e-3, 2e-3, 2e-4, 2e-4], rtol=1e-6)
