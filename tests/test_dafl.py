"""DAFL (config.method='dafl') and the DeepInversion BatchNorm prior: losses against
hand-computed values, the prior's statistics, and DAFL end to end on the tiny preset."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist
from rdskd_jax import config_lib, losses, runs, train, train_steps


def test_activation_loss_is_minus_mean_absolute_feature():
  features = jnp.array([[1.0, -3.0], [0.5, 0.5]])
  np.testing.assert_allclose(losses.activation_loss(features), -(4.0 / 2 + 1.0 / 2) / 2)


def test_dafl_generator_loss_by_hand():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
  features = np.array([[1.0, -2.0], [0.0, 3.0], [-1.0, 1.0], [2.0, 2.0]])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  one_hot = -np.mean(np.log(p.max(1)))
  activation = -np.mean(np.abs(features))
  pbar = p.mean(0)
  entropy10 = np.sum(pbar * np.log10(pbar))
  total, aux = losses.dafl_generator_loss(jnp.asarray(logits), jnp.asarray(features), 0.1, 5.0)
  np.testing.assert_allclose(aux['one_hot'], one_hot, rtol=1e-6)
  np.testing.assert_allclose(aux['activation'], activation, rtol=1e-6)
  np.testing.assert_allclose(aux['information_entropy'], entropy10, rtol=1e-6)
  np.testing.assert_allclose(total, one_hot + 0.1 * activation + 5.0 * entropy10, rtol=1e-6)


def test_bn_statistics_loss_by_hand():
  value = losses.bn_statistics_loss(
      [jnp.array([1.0, 2.0]), jnp.array([0.0])], [jnp.array([1.0, 1.0]), jnp.array([4.0])],
      [jnp.array([1.0, -1.0]), jnp.array([0.0])], [jnp.array([4.0, 5.0]), jnp.array([1.0])])
  np.testing.assert_allclose(value, 3.0 + 5.0 + 0.0 + 3.0, rtol=1e-6)  # 3-4-5 and |4-1|.


class _OneBatchNorm(nn.Module):
  """conv -> BatchNorm -> pool -> dense: the prior has one term, computable by hand."""
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(4, (3, 3), name='conv')(x)
    h = nn.BatchNorm(use_running_average=not train, name='bn')(h)
    features = jnp.mean(h, axis=(1, 2))
    return nn.Dense(3, name='fc')(features), features


def test_bn_prior_compares_batch_and_running_statistics_of_each_layer_input():
  model = _OneBatchNorm()
  images = jax.random.normal(jax.random.key(0), (8, 6, 6, 2))
  variables = model.init(jax.random.key(1), images)
  rng = np.random.default_rng(0)
  variables = {'params': variables['params'], 'batch_stats': {'bn': {
      'mean': jnp.asarray(rng.normal(size=4), jnp.float32),
      'var': jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)}}}
  logits, _, prior = train_steps.teacher_forward(model, variables, images, bn_prior=True)
  inputs = np.asarray(nn.Conv(4, (3, 3)).apply({'params': variables['params']['conv']}, images),
                      np.float64).reshape(-1, 4)
  stats = variables['batch_stats']['bn']
  expected = (np.linalg.norm(inputs.mean(0) - np.asarray(stats['mean'])) +
              np.linalg.norm(inputs.var(0) - np.asarray(stats['var'])))
  np.testing.assert_allclose(prior, expected, rtol=1e-5)
  np.testing.assert_allclose(logits, model.apply(variables, images)[0], rtol=1e-6)
  # Data parallel: four shards of the batch see the statistics of the whole batch.
  sharded = jax.vmap(lambda x: train_steps.teacher_forward(model, variables, x, bn_prior=True,
                                                     axis_name='d')[2], axis_name='d')
  np.testing.assert_allclose(sharded(images.reshape(4, 2, 6, 6, 2)), prior, rtol=1e-5)
  _, _, none = train_steps.teacher_forward(model, variables, images, bn_prior=False)
  assert float(none) == 0.0


def test_bn_prior_needs_a_batchnorm_teacher(tiny_config, tmp_path):
  tiny_config.generator.bn_prior_weight = 0.5
  with pytest.raises(config_lib.ConfigError, match=r"bn_prior_weight=0.5: expected 0 for "
                                                   r"teacher 'lenet5'"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_dafl_tiny_end_to_end(tiny_config, tmp_path):
  config = tiny_config
  config.method, config.figures = 'dafl', True
  assert (config.dafl.alpha, config.dafl.beta, config.dafl.generator_learning_rate,
          mnist.get_config().dafl.steps) == (0.1, 5.0, 0.2, 200 * 120)
  report = train.train_and_evaluate(config, str(tmp_path))
  assert report['dafl']['steps'] == 6 and report['student']['steps'] == 6
  assert 0.0 <= report['student']['test_accuracy'] <= 1.0
  assert 'frechet_distance_to_test' in report['diagnostics']
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  joint = [r for r in rows if r['stage'] == 'dafl']
  assert [r['step'] for r in joint] == [2, 3, 4, 6]
  for r in joint:
    assert {'one_hot', 'activation', 'information_entropy', 'total', 'kd'} <= set(r)
    assert r['activation'] < 0 and -1 - 1e-6 <= r['information_entropy'] <= 0  # log10: >= -1
  assert [r['step'] for r in joint if 'test_accuracy' in r] == [3, 6]
  assert not [r for r in rows if r['stage'] in ('generator', 'student')]
  assert os.path.getsize(os.path.join(tmp_path, 'curves.png')) > 1000
  run = runs.load_run(str(tmp_path))
  assert run.student_vars is not None and run.config.method == 'dafl'
