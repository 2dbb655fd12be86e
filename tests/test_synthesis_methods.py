"""DeepInversion (Yin et al. 2020) and ZSKD (Nayak et al. 2019), the methods without a
generator: gradients with respect to each device's inputs as on one device, what their
steps synthesise and train, one step on 2 devices (pmap, shard_map) against one in
float64, the tiny presets end to end on real MNIST, and resume after SIGKILL. Their loss
terms by hand: tests/test_inversion_losses.py."""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist
from jax.sharding import Mesh, PartitionSpec as P

from rdskd_jax import (losses, methods, parallel, plot, runs, stages, sweep, train,
                       train_steps)

from test_reliability import _finish, _rows, _start_and_signal, assert_same_result
import test_reliability


def _deepinversion(data_dir='', method='deepinversion', **fields):
  config = mnist.get_config('tiny')
  config.data_dir, config.method = data_dir, method
  for field, value in fields.items():
    parent, _, name = field.rpartition('.')
    (config[parent] if parent else config)[name] = value
  return config


def _global_input_loss(x, labels, axis_name=None):
  """Every kind of reduction the synthesis loss has: a mean, norms, BatchNorm-like
  statistics (a mean and a centred mean of squares), all over the global batch."""
  kw = dict(axis_name=axis_name)
  logits = jnp.sum(x, axis=(1, 2))[:, :1] * jnp.arange(3.0)
  flat = x.reshape(-1, x.shape[-1])
  mean = losses.global_mean(flat, **kw)
  var = losses.global_mean(jnp.square(flat - mean), **kw)
  return (losses.cross_entropy_loss(logits, labels, **kw) + losses.total_variation(x, **kw)
          + losses.image_l2(x, **kw) + jnp.sum(jnp.square(mean - 0.3)) + jnp.sum(var)), ()


@pytest.mark.parametrize('mode', ['pmap', 'shard_map'])
def test_input_gradients_on_two_devices_equal_one_device(mode):
  """With plain collectives, pmap's gradient of a replicated loss is N times the
  one-device gradient and shard_map's is not; differentiated once, each device gets its
  rows of the one-device gradient under both modes."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 6, 2)))
    labels = jnp.array([0, 1, 2, 0])
    want = jax.grad(_global_input_loss, has_aux=True)(x, labels)[0]
    grad = lambda a, b: jax.grad(train_steps._differentiated_once(
        functools.partial(_global_input_loss, axis_name='d'), 'd'), has_aux=True)(a, b)[0]
    if mode == 'pmap':
      got = jax.pmap(grad, axis_name='d', devices=jax.devices()[:2])(
          x.reshape(2, 2, 5, 6, 2), labels.reshape(2, 2)).reshape(x.shape)
    else:
      mesh = Mesh(np.asarray(jax.devices()[:2]), ('d',))
      got = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P('d'), P('d')),
                                  out_specs=P('d')))(x, labels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


def _setup(config):
  teacher, _, student = stages.build_networks(config, 10, 1)
  teacher_vars = teacher.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)))
  method = methods.get(config.method)
  state, step_fn = method.setup(config, 1, 10, teacher, student)
  frozen = method.frozen(config, teacher_vars, 10)
  return teacher, frozen, student, state, step_fn


def test_one_step_synthesises_a_batch_then_trains_the_student():
  """A step fills the bank's next rows with inputs the teacher finds more like their
  labels than the noise they started from, and takes student.steps / deepinversion.steps
  KD steps of the student."""
  config = _deepinversion(**{'deepinversion.iterations': 30, 'deepinversion.learning_rate': 0.1})
  teacher, frozen, student, state, step_fn = _setup(config)
  teacher_vars = frozen['teacher']
  step = jax.jit(lambda s: step_fn(s, frozen, jax.random.key(0), axis_name=None))
  new, metrics = step(state)
  batch = config.deepinversion.batch_size
  assert new['bank'].shape == (config.deepinversion.steps * batch, 32, 32, 1)
  assert (int(new['step']), int(new['student']['step'])) == (1, 2)
  assert int(new['nonfinite']['total']) == 0
  filled = np.asarray(new['bank'])
  assert np.all(np.any(filled[:batch] != 0, axis=(1, 2, 3))) and not np.any(filled[batch:])
  assert float(metrics['best_total']) <= float(metrics['total']) + 1e-6
  labels = np.arange(batch) % 10  # The authors' labels: the classes in turn.
  noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(jax.random.key(0), 0), 0), 0), filled[:batch].shape)
  ce = lambda images: float(losses.cross_entropy_loss(
      teacher.apply(teacher_vars, images, train=False)[0], jnp.asarray(labels)))
  assert ce(filled[:batch]) < ce(noise)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       new['student']['params'], state['student']['params'])
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize('method,mode,start', [
    ('deepinversion', 'pmap', 0), ('deepinversion', 'shard_map', 1), ('zskd', 'pmap', 0),
    ('zskd', 'shard_map', 3)])
def test_one_step_on_two_devices_equals_one_in_float64(method, mode, start):
  """One whole step on two devices against plain jit on one: DeepInversion's synthesis
  with every term weighted, the bank and the KD steps; ZSKD's impressions (step 0) and
  its KD steps on the complete set (step 3, after its 3 batches)."""
  with jax.enable_x64(True):
    config = _deepinversion(method=method, dtype='float64',
                            **{'deepinversion.iterations': 6, 'zskd.iterations': 6})
    _, frozen, _, state, step_fn = _setup(config)
    bank = jax.random.normal(jax.random.key(3), state['bank'].shape, state['bank'].dtype)
    state = dict(state, step=jnp.int32(start), bank=jnp.where(start > 0, bank, state['bank']))
    key = stages.stage_key(config, method)
    results = []
    for par in (parallel.DataParallel('none'), parallel.DataParallel(mode, 2)):
      new, metrics = par.wrap(step_fn)(par.replicate(state), par.replicate(frozen), key)
      results.append((par.to_host(new), par.to_host(metrics)))
    (one, one_metrics), (two, two_metrics) = results
    # The synthesis computes in float64 throughout; the student's parameters are float32
    # (train_steps._in_compute_precision), so its KD loss agrees to their rounding.
    for name, value in one_metrics.items():
      np.testing.assert_allclose(two_metrics[name], value, rtol=1e-6 if name == 'kd' else 1e-9,
                                 err_msg=name)
    assert any(float(v) != 0 for v in one_metrics.values())
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(two)[0], jax.tree.leaves(one)):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_zskd_synthesises_every_batch_then_distils_on_the_whole_set():
  """Steps 0..B-1 fill batch after batch (the teacher closer to their soft targets than
  on the noise they started from) and leave the student alone; steps B.. train it and
  leave the set alone."""
  config = _deepinversion(method='zskd', **{'zskd.iterations': 30})
  teacher, frozen, _, state, step_fn = _setup(config)
  similarity = np.asarray(frozen['similarity'])
  assert similarity.shape == (10, 10) and np.allclose(np.diag(similarity), 1.0)
  step = jax.jit(lambda s: step_fn(s, frozen, jax.random.key(0), axis_name=None))
  batch, batches = config.zskd.batch_size, config.zskd.steps
  for i in range(batches):
    new, metrics = step(state)
    rows = np.asarray(new['bank'])
    assert np.all(np.any(rows[:(i + 1) * batch] != 0, axis=(1, 2, 3)))
    assert not np.any(rows[(i + 1) * batch:])
    assert int(new['student']['step']) == 0 and float(metrics['kd']) == 0
    assert 0 < float(metrics['best_total']) <= float(metrics['impression']) + 1e-6
    state = new
  new, metrics = step(state)
  assert int(new['student']['step']) == config.student.steps // batches
  assert float(metrics['kd']) > 0 and float(metrics['impression']) == 0
  np.testing.assert_array_equal(np.asarray(new['bank']), np.asarray(state['bank']))


def _shifted(image, dy, dx, m, fill):
  """`image` translated as data.random_shift does for offsets (dy, dx) in 0..2m."""
  h, w, _ = image.shape
  padded = np.empty((h + 2 * m, w + 2 * m, image.shape[-1]), image.dtype)
  padded[...] = fill
  padded[m:m + h, m:m + w] = image
  return padded[dy:dy + h, dx:dx + w]


def test_shift_and_flip_translates_and_mirrors_each_image_within_range():
  """Each output is its input translated by one offset in -m..m per axis, the shifted-in
  pixels the fill of their channel, then mirrored or not; offsets and mirrors vary."""
  images = np.random.default_rng(0).normal(size=(64, 6, 7, 2)).astype(np.float32)
  fill, m = (-0.5, 2.0), 2
  out = np.asarray(train_steps.shift_and_flip(jax.random.key(1), jnp.asarray(images),
                                              max_shift=m, flip=True, fill=fill))
  seen = set()
  for image, got in zip(images, out):
    found = [(dy, dx, mirror) for dy in range(2 * m + 1) for dx in range(2 * m + 1)
             for mirror in (False, True)
             if np.array_equal(got, (lambda a: a[:, ::-1] if mirror else a)(
                 _shifted(image, dy, dx, m, fill)))]
    assert len(found) == 1
    seen.add(found[0])
  assert len({s[:2] for s in seen}) > 10 and {s[2] for s in seen} == {False, True}
  same = train_steps.shift_and_flip(jax.random.key(1), jnp.asarray(images), max_shift=0,
                                    flip=False, fill=fill)
  np.testing.assert_array_equal(np.asarray(same), images)


def test_zskd_distils_on_augmented_impressions():
  """ZSKD's KD step takes its batches through shift_and_flip: with zskd.max_shift=0 the
  same step trains the student to other parameters, and every parameter stays finite."""
  students = []
  for shift in (2, 0):
    config = _deepinversion(method='zskd', **{'zskd.max_shift': shift})
    _, frozen, _, state, step_fn = _setup(config)
    bank = jax.random.normal(jax.random.key(3), state['bank'].shape, state['bank'].dtype)
    state = dict(state, step=jnp.int32(config.zskd.steps), bank=bank)
    new, _ = jax.jit(lambda s: step_fn(s, frozen, jax.random.key(0), axis_name=None))(state)
    students.append(jax.tree.leaves(new['student']['params']))
  assert all(np.all(np.isfinite(a)) for a in students[0])
  assert any(not np.allclose(a, b) for a, b in zip(*students))


@pytest.mark.parametrize('method', ['deepinversion', 'zskd'])
def test_tiny_end_to_end(mnist_data_dir, tmp_path, method):
  config = _deepinversion(mnist_data_dir, method, figures=True)
  report = train.train_and_evaluate(config, str(tmp_path))
  batches, batch = config[method].steps, config[method].batch_size
  stage_steps = batches * (2 if method == 'zskd' else 1)
  assert report[method]['steps'] == stage_steps
  assert report[method]['images'] == batches * batch
  assert report['student']['steps'] == config.student.steps and 'generator' not in report
  assert 0 <= report['student']['test_accuracy'] <= 1
  assert 0 <= report['student']['generated_agreement'] <= 1
  assert report['diagnostics']['samples'] == batches * batch
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  logged = [r for r in rows if r['stage'] == method]
  # log_every 2 and the last step; student.eval_every 3 KD steps: every 2nd step.
  assert [r['step'] for r in logged] == list(range(2, stage_steps, 2)) + [stage_steps]
  if method == 'deepinversion':
    assert all(r['class'] > 0 and r['tv'] > 0 and r['kd'] >= 0 and 0 <= r['competition'] <= 1
               for r in logged)
  else:  # Impressions in the first half, KD in the second.
    assert logged[0]['impression'] > 0 and logged[0]['kd'] == 0
    assert logged[-1]['impression'] == 0 and logged[-1]['kd'] > 0
  assert 'test_accuracy' in logged[0]
  assert os.path.getsize(tmp_path / 'samples.png') > 1000
  run = runs.load_run(str(tmp_path))  # No generator: the synthesised set instead.
  assert run.generator is None and run.images.shape == (batches * batch, 32, 32, 1)
  os.remove(tmp_path / 'samples.png')
  assert plot.main([f'--workdir={tmp_path}']) == 0
  assert os.path.getsize(tmp_path / 'samples.png') > 1000


@pytest.mark.parametrize('method', ['deepinversion', 'zskd'])
def test_sigkill_then_resume(mnist_arrays_dir, tmp_path, tmp_path_factory, monkeypatch, method):
  # 2 KD steps in each of 20 steps (DeepInversion) or of the last 10 of 20 (ZSKD).
  batches = 20 if method == 'deepinversion' else 10
  overrides = dict(test_reliability.OVERRIDES, method=method, **{f'{method}.steps': batches})
  if method == 'zskd':
    overrides['student.steps'] = 20
  monkeypatch.setattr(test_reliability, 'OVERRIDES', overrides)
  reference = str(tmp_path_factory.mktemp('whole'))
  whole = train.train_and_evaluate(test_reliability._config(mnist_arrays_dir), reference)
  code, _ = _start_and_signal(mnist_arrays_dir, tmp_path, method, 6, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert max(r['step'] for r in _rows(tmp_path) if r['stage'] == method) < 20
  _finish(mnist_arrays_dir, tmp_path)
  assert_same_result(tmp_path, (reference, whole))


def test_only_the_running_methods_batch_must_split_over_the_devices():
  """ZSKD's batch of 100 does not split over 8 devices: refused for a ZSKD run, not for an
  RDSKD run, which never makes impressions."""
  from rdskd_jax import config_checks
  from rdskd_jax.errors import ConfigError
  config = mnist.get_config('paper')
  config_checks.validate(config, 8)
  config.method = 'zskd'
  with pytest.raises(ConfigError, match=r'config.zskd.batch_size=100: expected a multiple '
                     r'of the 8 devices'):
    config_checks.validate(config, 8)


def test_bad_settings_are_refused_in_one_line(mnist_data_dir, tmp_path):
  from rdskd_jax import config_checks
  from rdskd_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r'config.zskd.max_shift=16: expected a shift in '
                     r'whole pixels, 0 <= shift < image_size / 2'):
    config_checks.validate(_deepinversion(method='zskd', **{'zskd.max_shift': 16}), 1)
  with pytest.raises(ConfigError, match=r'config.zskd.max_shift=-1: expected'):
    config_checks.validate(_deepinversion(method='zskd', **{'zskd.max_shift': -1}), 1)
  with pytest.raises(ConfigError, match=r'student.steps=7: expected a multiple of '
                     r'deepinversion.steps=3'):
    train.train_and_evaluate(_deepinversion(mnist_data_dir, **{'student.steps': 7}),
                             str(tmp_path / 'a'))
  with pytest.raises(ConfigError, match=r"config.method='deepinversion' with --vmap: "
                     r'expected --novmap'):
    sweep.sweep(_deepinversion(mnist_data_dir), str(tmp_path / 'sweep'), 1,
                'deepinversion.learning_rate=0.05,0.1')
  with pytest.raises(ConfigError, match=r"deepinversion.bn_weight=10.0: expected 0 for "
                     r"teacher 'lenet5'"):
    train.train_and_evaluate(_deepinversion(mnist_data_dir, **{'deepinversion.bn_weight': 10.0}),
                             str(tmp_path / 'b'))
