"""DFAD (Fang et al. 2019) as a method of the pipeline: its discrepancy by hand, what one
step trains, the tiny preset end to end on real MNIST with 2 devices against one in
float64, and resume after SIGKILL."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist
from rdskd_jax import losses, stages, train
from rdskd_jax.methods import dfad

from test_parallel import one_and_two_devices_in_float64
from test_reliability import _finish, _rows, _start_and_signal, assert_same_result, tiny_config
import test_reliability


def test_logit_discrepancy_by_hand():
  student = jnp.array([[1.0, 2.0, -1.0], [3.0, -1.0, 0.5]])
  teacher = jnp.array([[0.0, 2.0, 1.0], [1.0, 1.0, 0.5]])
  # |s - t| = [[1, 0, 2], [2, 2, 0]]; per sample 1 and 4/3; mean 7/6.
  assert float(losses.logit_discrepancy(student, teacher)) == pytest.approx(7 / 6)
  # On two devices, each with one sample: the mean of the global batch.
  pmapped = jax.pmap(lambda s, t: losses.logit_discrepancy(s, t, axis_name='d'),
                     axis_name='d', devices=jax.devices()[:2])
  np.testing.assert_allclose(pmapped(student[:, None], teacher[:, None]), [7 / 6] * 2,
                             rtol=1e-6)
  # The generator's ascent direction: d D / d s = sign(s - t) / (N C), away from ties.
  student = student + jnp.array([[0.0, 0.5, 0.0], [0.0, 0.0, -0.25]])
  grad = jax.grad(losses.logit_discrepancy)(student, teacher)
  np.testing.assert_allclose(grad, np.sign(student - teacher) / 6)


def _dfad(data_dir, **fields):
  return tiny_config(data_dir, dict(fields, method='dfad'))


def test_one_step_trains_the_student_then_the_generator(mnist_data_dir):
  """A step takes `student_updates` student steps and one generator step; the student
  step lowers the discrepancy on its batch, the generator step raises it on its own."""
  config = _dfad(mnist_data_dir, **{'dfad.student_updates': 3, 'dfad.batch_size': 32})
  teacher, generator, student = stages.build_networks(config, 10, 1)
  teacher_vars = teacher.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)))
  state, step_fn = dfad.setup(config, 1, generator, teacher, student)
  step = jax.jit(lambda s: step_fn(s, {'teacher': teacher_vars}, jax.random.key(0),
                                   axis_name=None))
  new, metrics = step(state)
  assert (int(new['step']), int(new['student']['step']), int(new['generator']['step'])) == (1, 3, 1)
  assert int(new['nonfinite']['total']) == 0
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in metrics.values())
  for network in ('student', 'generator'):
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         new[network]['params'], state[network]['params'])
    assert max(jax.tree.leaves(moved)) > 0, network

  def discrepancy(generator_state, student_params, z):
    images = generator.apply({'params': generator_state['params'],
                              'batch_stats': generator_state['batch_stats']}, z, train=True,
                             mutable=['batch_stats'])[0]
    return float(losses.logit_discrepancy(student.apply({'params': student_params}, images)[0],
                                          teacher.apply(teacher_vars, images)[0]))
  z = jax.random.normal(jax.random.key(9), (32, config.generator.latent_dim))
  before = discrepancy(state['generator'], state['student']['params'], z)
  assert discrepancy(state['generator'], new['student']['params'], z) < before
  assert discrepancy(new['generator'], new['student']['params'], z) > discrepancy(
      state['generator'], new['student']['params'], z)


def test_tiny_end_to_end_and_two_devices_equal_one_in_float64(mnist_data_dir, tmp_path):
  """The tiny preset end to end on one device (float64, figures drawn), then on 2 devices
  from its teacher: every logged loss and the final state equal the one device's."""
  report = one_and_two_devices_in_float64(lambda **f: _dfad(mnist_data_dir, **f), tmp_path,
                                          'dfad')
  assert report['dfad']['steps'] == 6 and report['generator']['trained_with'] == 'student'
  assert 0 <= report['student']['test_accuracy'] <= 1
  assert 0 <= report['student']['generated_agreement'] <= 1
  rows = [json.loads(line) for line in open(tmp_path / 'one' / 'metrics.jsonl')]
  dfad = [r for r in rows if r['stage'] == 'dfad']
  assert [r['step'] for r in dfad] == [2, 3, 4, 6]  # log_every 2, evaluation every 3.
  assert all(r['student_l1'] > 0 and r['generator_l1'] > 0 for r in dfad)
  assert os.path.getsize(tmp_path / 'one' / 'samples.png') > 1000


def test_sigkill_then_resume(mnist_arrays_dir, tmp_path, tmp_path_factory, monkeypatch):
  overrides = dict(test_reliability.OVERRIDES, method='dfad', **{'dfad.steps': 30})
  monkeypatch.setattr(test_reliability, 'OVERRIDES', overrides)
  reference = str(tmp_path_factory.mktemp('whole'))
  whole = train.train_and_evaluate(test_reliability._config(mnist_arrays_dir), reference)
  code, _ = _start_and_signal(mnist_arrays_dir, tmp_path, 'dfad', 10, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert max(r['step'] for r in _rows(tmp_path) if r['stage'] == 'dfad') < 30
  _finish(mnist_arrays_dir, tmp_path)
  assert_same_result(tmp_path, (reference, whole))


def test_another_methods_block_does_not_block_a_resume():
  """A workdir started before config.dfad existed resumes, and a change to another
  method's block (dafl.beta in an RDSKD run) changes nothing a run computes."""
  from rdskd_jax import workdir
  config = mnist.get_config('smoke')
  saved = json.loads(json.dumps(config.to_dict()))
  del saved['dfad']
  saved['dafl']['beta'] = 1.0
  assert workdir.config_differences(saved, config) == {}
  config.method = 'dafl'
  assert set(workdir.config_differences(saved, config)) == {'method', 'dafl.beta'}
