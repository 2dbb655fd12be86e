"""Pieces of the pipeline: augmentation, the per-device noise split, the metrics log."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax import data, methods, metrics, parallel, stages, train_steps
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.methods import rdskd


def test_random_shift_moves_content_and_fills_the_border():
  images = np.zeros((64, 8, 8, 1), np.float32)
  images[:, 3:5, 3:5] = 1.0
  shifted = data.random_shift(np.random.default_rng(0), images, 2, np.float32([-0.5]))
  assert shifted.shape == images.shape
  assert np.all((shifted == 1.0).sum(axis=(1, 2, 3)) == 4)  # The block stays whole.
  assert set(np.unique(shifted)) <= {-0.5, 0.0, 1.0}  # Only content, background and fill.
  assert np.any(shifted == -0.5)
  assert len({tuple(np.argwhere(s[..., 0] == 1.0)[0]) for s in shifted}) > 10
  assert data.random_shift(np.random.default_rng(0), images, 0, 0.0) is images


def test_local_noise_slices_pair_up_across_devices():
  key, batch, devices = jax.random.key(3), 16, 4
  whole = train_steps.local_noise(key, batch, 5, None)
  local = jax.vmap(lambda _: train_steps.local_noise(key, batch, 5, 'd'), axis_name='d')(
      jnp.arange(devices))
  per = batch // 2 // devices
  for d in range(devices):
    np.testing.assert_array_equal(local[d, :per], whole[d * per:(d + 1) * per])
    np.testing.assert_array_equal(local[d, per:], whole[batch // 2 + d * per:][:per])


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
  log = metrics.MetricsLog(str(tmp_path))
  for step in (2, 4, 6):
    log.write('generator', step, {'total': float(step)})
  log.write('student', 2, {'kd': 1.0})
  log.resume('generator', 4)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['stage'], r['step']) for r in rows] == [('generator', 2), ('generator', 4),
                                                     ('student', 2)]


def _student_steps(config, mode, devices, steps=2):
  """The student's state after `steps` steps on the tiny networks, from a fresh generator
  whose running BatchNorm statistics are far from any batch's."""
  teacher, generator, student = stages.build_networks(config, 10, 1)
  gen_state, _ = rdskd.generator_setup(config, generator, teacher)
  gen_vars = train_steps.variables_of(gen_state)
  gen_vars['batch_stats'] = jax.tree.map(lambda v: v + 3.0, gen_vars['batch_stats'])
  teacher_params, _ = train_steps.classifier_init(teacher, jax.random.key(5), (32, 32, 1))
  frozen = {'teacher': {'params': teacher_params}, 'generator': gen_vars}
  state, step_fn = rdskd.student_setup(config, 1, 10, generator, teacher, student)
  par = parallel.DataParallel(mode, devices)
  step = par.wrap(step_fn)
  state, frozen = par.replicate(state), par.replicate(frozen)
  for _ in range(steps):
    state, metrics = step(state, frozen, jax.random.key(7))
  return par.to_host(state), float(par.to_host(metrics)['kd'])


def test_generator_batch_statistics_are_global_under_data_parallelism():
  """student.generator_batchnorm='batch' normalises the global batch: four devices take
  the one-device step (float64 compute). It is a different step from 'running'."""
  from configs import mnist
  with jax.enable_x64(True):
    config = mnist.get_config('tiny')
    config.dtype = 'float64'
    config.student.generator_batchnorm = 'batch'
    one, kd_one = _student_steps(config, 'none', 1)
    four, kd_four = _student_steps(config, 'shard_map', 4)
    config.student.generator_batchnorm = 'running'
    running, kd_running = _student_steps(config, 'none', 1)
  np.testing.assert_allclose(kd_four, kd_one, rtol=1e-6)
  # The parameters are stored in float32: the two runs end a float32 ulp or two apart
  # (1.5e-8 seen); another normalisation ('running') ends them 3e-3 apart (median).
  for a, b in zip(jax.tree.leaves(four['params']), jax.tree.leaves(one['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert abs(kd_running - kd_one) > 1e-3 * abs(kd_one)


def test_workdirs_and_reports_from_before_generator_batchnorm_still_load(tmp_path):
  """A saved config without student.generator_batchnorm stands for 'running', the only
  behaviour before the field existed: no difference, so the workdir resumes."""
  from configs import mnist
  config = mnist.get_config('smoke')
  saved = json.loads(json.dumps(config.to_dict()))
  del saved['student']['generator_batchnorm']
  assert workdir_lib.config_differences(saved, config) == {}
  config.student.generator_batchnorm = 'batch'
  assert workdir_lib.config_differences(saved, config) == {
      'student.generator_batchnorm': ('running', 'batch')}


def test_every_stream_of_every_seed_has_its_own_key(smoke_config):
  """Initial weights and per-step noise fold from one root key per run, by name: no two
  networks or streams of a run share a key, nor do a run and the next seed's run."""
  keys = {}
  for seed in range(3):
    config = smoke_config.copy_and_resolve_references()
    config.seed = seed
    for name in [*stages.STAGE_KEYS, *methods.STAGE_KEYS]:
      keys[seed, name] = tuple(np.asarray(jax.random.key_data(stages.stage_key(config, name))))
  assert len(set(keys.values())) == len(keys) == 3 * (len(stages.STAGE_KEYS)
                                                       + len(methods.STAGE_KEYS))
  for network in ('teacher', 'generator', 'student'):
    assert keys[0, f'{network}_init'] == tuple(
        np.asarray(jax.random.key_data(stages.init_key(smoke_config, network))))

  # The stages start from those keys: the student's initial weights are its named key's.
  _, generator, student = stages.build_networks(smoke_config, 10, 1)
  state, _ = rdskd.student_setup(smoke_config, 1, 10, generator, None, student)
  expected, _ = train_steps.classifier_init(student, stages.init_key(smoke_config, 'student'),
                                            (32, 32, 1))
  jax.tree.map(np.testing.assert_array_equal, state['params'], expected)


def test_a_data_parallel_step_is_about_the_size_of_the_one_device_step():
  """The skipped-step flag is computed once under data parallelism: where XLA copied its
  chain of scalar ANDs into every parameter's update, the 2-device program of this step
  was several times the 1-device one, and slower to compile (benchmarks/README.md)."""
  from benchmarks import compile_time
  one, two = (compile_time.measure('wrn_16_1', 0.25, n) for n in (1, 2))
  assert two['all_reduces'] >= one['all_reduces'] > 0
  assert two['hlo_lines'] < 1.3 * one['hlo_lines'], (one, two)
