"""MSKD (Micaelli and Storkey 2019) as a method of the pipeline: its losses by hand, what
one iteration trains, the tiny preset end to end on real MNIST (in float64, on 1 and 2
devices, which must agree) and on mock CIFAR-10, resume after SIGKILL, and the refusal
of a teacher without attention maps."""

import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10, mnist
from rdskd_jax import stages, train
from rdskd_jax.errors import ConfigError
from rdskd_jax.methods import mskd

from test_datasets import BATCHNORM_PAIR, _run, mock_tfds  # noqa: F401 (a fixture)
from test_parallel import one_and_two_devices_in_float64
from test_reliability import _finish, _rows, _start_and_signal, assert_same_result, tiny_config
import test_reliability


def test_belief_divergence_by_hand():
  student = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
  teacher = jnp.log(jnp.array([[0.25, 0.5, 0.25], [0.2, 0.2, 0.6]]))
  # Sample 1: 0.25 ln(0.5) + 0.5 ln 2 + 0 = 0.25 ln 2; sample 2: 0. Mean over 2 x 3 entries.
  expected = 0.25 * np.log(2) / 6
  assert float(mskd.belief_divergence(student, teacher, 1.0)) == pytest.approx(expected)
  # The temperature divides the logits before both softmaxes.
  scaled = mskd.belief_divergence(2 * student, 2 * teacher, 2.0)
  assert float(scaled) == pytest.approx(expected)
  pmapped = jax.pmap(lambda s, t: mskd.belief_divergence(s, t, 1.0, axis_name='d'),
                     axis_name='d', devices=jax.devices()[:2])
  np.testing.assert_allclose(pmapped(student[:, None], teacher[:, None]), [expected] * 2,
                             rtol=1e-6)


def test_attention_transfer_by_hand():
  # One sample, 2x1 positions, 2 channels: mean of squares per position (5, 2), normed.
  s = jnp.array([[[[1.0, 3.0]], [[2.0, 0.0]]]])
  t = jnp.array([[[[0.0, 2.0]], [[0.0, 2.0]]]])
  a_s = np.array([5.0, 2.0]) / np.sqrt(29.0)
  a_t = np.array([2.0, 2.0]) / np.sqrt(8.0)
  np.testing.assert_allclose(mskd.attention_map(s), a_s[None], rtol=1e-6)
  one = np.mean((a_s - a_t) ** 2)
  # Summed over the paired maps, each the mean over the batch and positions.
  assert float(mskd.attention_transfer([s, s], [t, s])) == pytest.approx(one)
  assert float(mskd.attention_transfer([s, s], [t, t])) == pytest.approx(2 * one)
  # Scale-free: a map times a constant has the same attention.
  assert float(mskd.attention_transfer([3 * s], [s])) == pytest.approx(0.0, abs=1e-12)


def _mskd(data_dir, **fields):
  return tiny_config(data_dir, dict(fields, method='mskd'))


def test_one_iteration_trains_the_generator_then_the_student(mnist_data_dir):
  """An iteration takes `generator_updates` generator steps and `student_updates` student
  steps on one noise batch: the generator raises the divergence on it, the student lowers
  it."""
  config = _mskd(mnist_data_dir, **{'mskd.student_updates': 3, 'mskd.batch_size': 32})
  teacher, generator, student = stages.build_networks(config, 10, 1)
  teacher_vars = teacher.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)))
  state, step_fn = mskd.setup(config, 1, generator, teacher, student)
  key = jax.random.key(0)
  new, metrics = jax.jit(lambda s: step_fn(s, {'teacher': teacher_vars}, key,
                                           axis_name=None))(state)
  assert (int(new['step']), int(new['generator']['step']), int(new['student']['step'])) == (
      1, 1, 3)
  assert int(new['nonfinite']['total']) == 0
  assert set(metrics) == {'generator_kl', 'student_kl', 'attention', 'student_total'}
  assert all(np.isfinite(float(v)) for v in metrics.values())

  def divergence(generator_state, student_params):
    z = jax.random.normal(jax.random.fold_in(key, 0), (32, config.generator.latent_dim))
    images = generator.apply({'params': generator_state['params'],
                              'batch_stats': generator_state['batch_stats']}, z, train=True,
                             mutable=['batch_stats'])[0]
    return float(mskd.belief_divergence(student.apply({'params': student_params}, images)[0],
                                        teacher.apply(teacher_vars, images)[0], 1.0))
  before = divergence(state['generator'], state['student']['params'])
  assert divergence(new['generator'], state['student']['params']) > before
  assert divergence(new['generator'], new['student']['params']) < divergence(
      new['generator'], state['student']['params'])


def test_mskd_on_cifar10(mock_tfds, tmp_path):  # noqa: F811 (the fixture)
  """MSKD with BatchNorm networks: the attention maps of residual groups."""
  config = cifar10.get_config('tiny')
  config.method = 'mskd'
  config.teacher.model = config.student.model = BATCHNORM_PAIR
  report = _run(config, tmp_path)
  assert report['mskd']['steps'] == config.mskd.steps
  assert report['config']['mskd']['beta'] == 250.0  # The authors' CIFAR-10 weight.


def test_tiny_end_to_end_and_two_devices_equal_one_in_float64(mnist_data_dir, tmp_path):
  report = one_and_two_devices_in_float64(lambda **f: _mskd(mnist_data_dir, **f), tmp_path,
                                          'mskd')
  # The one-device run end to end: its report, and its metrics every log_every (2) steps
  # and at each evaluation (every 3).
  assert report['mskd']['steps'] == 6 and report['generator']['trained_with'] == 'student'
  assert 0 <= report['student']['test_accuracy'] <= 1
  assert 0 <= report['student']['generated_agreement'] <= 1
  rows = [r for r in map(json.loads, open(tmp_path / 'one' / 'metrics.jsonl'))
          if r['stage'] == 'mskd']
  assert [r['step'] for r in rows] == [2, 3, 4, 6]
  assert all(r['attention'] >= 0 and r['generator_kl'] >= 0 for r in rows)
  for figure in ('samples.png', 'curves.png'):  # Its own curves (methods' CURVES).
    assert os.path.getsize(tmp_path / 'one' / figure) > 1000


def test_sigkill_then_resume(mnist_arrays_dir, tmp_path, tmp_path_factory, monkeypatch):
  overrides = dict(test_reliability.OVERRIDES, method='mskd',
                   **{'mskd.steps': 30, 'mskd.student_updates': 2})
  monkeypatch.setattr(test_reliability, 'OVERRIDES', overrides)
  reference = str(tmp_path_factory.mktemp('whole'))
  whole = train.train_and_evaluate(test_reliability._config(mnist_arrays_dir), reference)
  code, _ = _start_and_signal(mnist_arrays_dir, tmp_path, 'mskd', 10, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert max(r['step'] for r in _rows(tmp_path) if r['stage'] == 'mskd') < 30
  _finish(mnist_arrays_dir, tmp_path)
  assert_same_result(tmp_path, (reference, whole))


class _NoMaps(nn.Module):
  """A teacher from outside: logits and features, no marked feature maps."""

  @nn.compact
  def __call__(self, images, train=False):
    features = nn.relu(nn.Dense(16)(images.reshape(images.shape[0], -1)))
    return nn.Dense(10)(features), features


def test_a_teacher_without_attention_maps_is_refused_in_one_line():
  config = _mskd('')
  teacher = _NoMaps()
  variables = teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  student = stages.build_networks(config, 10, 1)[2]
  with pytest.raises(ConfigError, match=r'config.mskd.beta=250.0: expected 0 for this '
                     r"teacher, whose feature maps \(none marked\) do not pair"):
    mskd.check_attention(config, teacher, variables, student, 1)
  config.mskd.beta = 0.0  # Without the term, any teacher serves.
  mskd.check_attention(config, teacher, variables, student, 1)


def test_workdirs_from_before_mskd_resume():
  """A workdir whose config.json predates config.mskd (the runs before this method, the
  paper-budget run among them) resumes: the block is another method's there."""
  from rdskd_jax import workdir
  config = mnist.get_config('cpu')
  saved = json.loads(json.dumps(config.to_dict()))
  del saved['mskd']
  assert workdir.config_differences(saved, config) == {}
