"""Reliability: interrupted runs resume to the uninterrupted result, non-finite steps are
skipped and counted, and workdirs of another config are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist
from rdskd_jax import config_lib, errors, metrics, models, parallel, runner, stages, train
from rdskd_jax import teacher as teacher_lib
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.methods import rdskd


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough stages to interrupt in the middle; still seconds each.
# A generator watch (512 samples through both networks) every 8 steps: the watches cost
# more than these runs' steps, and their rows resume as any row does.
OVERRIDES = {'generator.steps': 40, 'student.steps': 40, 'checkpoint_every': 8,
             'log_every': 1, 'student.eval_every': 20, 'image_every': 8, 'parallel': 'none'}


def tiny_config(data_dir, fields):
  """The tiny MNIST preset on `data_dir` with `fields` ({'student.steps': 40, ...}) set."""
  config = mnist.get_config('tiny')
  config.data_dir = data_dir
  for field, value in fields.items():
    parent, _, name = field.rpartition('.')
    (config[parent] if parent else config)[name] = value
  return config


def _config(data_dir):
  return tiny_config(data_dir, OVERRIDES)


def _command(data_dir, workdir):
  return ([sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:tiny',
           f'--config.data_dir={data_dir}', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in OVERRIDES.items()])


def _rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def _start_and_signal(data_dir, workdir, stage, past_step, signum):
  """Starts the command line and sends `signum` once `stage` has logged `past_step`."""
  proc = subprocess.Popen(_command(data_dir, workdir), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(r['stage'] == stage and r['step'] >= past_step for r in _rows(workdir)):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.02)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def _finish(data_dir, workdir):
  """The rest of an interrupted run, in this process: what resumes is the workdir, and a
  start by the command line is shown by the signalled starts before it."""
  train.train_and_evaluate(_config(data_dir), str(workdir))


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory, mnist_arrays_dir):
  workdir = str(tmp_path_factory.mktemp('whole'))
  return workdir, train.train_and_evaluate(_config(mnist_arrays_dir), workdir)


def assert_same_result(workdir, reference):
  ref_dir, ref_report = reference
  got, want = _rows(workdir), _rows(ref_dir)
  # Every step logged once, in order, with the same values: nothing lost or repeated.
  assert [(r['stage'], r['step']) for r in got] == [(r['stage'], r['step']) for r in want]
  for g, w in zip(got, want):
    for name, value in w.items():
      if name not in ('stage', 'step'):
        np.testing.assert_allclose(g[name], value, rtol=1e-6, err_msg=str((w['stage'], w['step'], name)))
  report = json.load(open(os.path.join(workdir, 'report.json')))
  for key in ('test_accuracy', 'generated_agreement'):
    assert abs(report['student'][key] - ref_report['student'][key]) <= 1e-6


def test_sigterm_then_sigkill_then_resume(uninterrupted, mnist_arrays_dir, tmp_path):
  """SIGTERM in the generator stage checkpoints the step it stopped after (exit 143, one
  line); SIGKILL in the student stage loses what followed its last checkpoint; the run
  then resumed ends in the uninterrupted result, every step logged once."""
  code, err = _start_and_signal(mnist_arrays_dir, tmp_path, 'generator', 10, signal.SIGTERM)
  assert code == 143, err[-2000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith('stopped: generator: stopped by SIGTERM after step ')
  step = int(line.split('after step ')[1].split('/')[0])
  assert 10 <= step < 40
  assert str(step) in os.listdir(tmp_path / 'checkpoints' / 'generator')  # Not only every 8.
  assert not any(r['stage'] == 'student' for r in _rows(tmp_path))
  code, _ = _start_and_signal(mnist_arrays_dir, tmp_path, 'student', 12, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert max(r['step'] for r in _rows(tmp_path) if r['stage'] == 'student') < 40
  _finish(mnist_arrays_dir, tmp_path)
  assert_same_result(tmp_path, uninterrupted)


def _generator_setup(config):
  par = parallel.DataParallel('none')
  teacher = models.create_classifier('lenet5', 10)
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
  generator = models.Generator(width=config.generator.width)
  state, step_fn = rdskd.generator_setup(config, generator, teacher)
  poisoned = jax.tree.map(lambda x: x * jnp.nan, teacher_vars)
  return par, state, step_fn, teacher_vars, poisoned


def test_nonfinite_step_is_skipped_and_training_goes_on():
  config = mnist.get_config('tiny')
  par, state, step_fn, teacher_vars, poisoned = _generator_setup(config)
  step = par.wrap(step_fn)
  key = jax.random.key(0)
  state, _ = step(par.replicate(state), par.replicate({'teacher': teacher_vars}), key)
  before = par.to_host(state)
  state, metrics = step(state, par.replicate({'teacher': poisoned}), key)
  skipped = par.to_host(state)
  assert not np.isfinite(float(metrics['total']))
  assert int(skipped['step']) == 2  # The step is spent...
  assert (int(skipped['nonfinite']['total']), int(skipped['nonfinite']['streak'])) == (1, 1)
  for name in ('params', 'opt_state', 'batch_stats', 'loss_refs'):  # ...its update is not.
    jax.tree.map(np.testing.assert_array_equal, skipped[name], before[name])
  state, metrics = step(state, par.replicate({'teacher': teacher_vars}), key)
  after = par.to_host(state)
  assert np.isfinite(float(metrics['total']))
  assert (int(after['nonfinite']['total']), int(after['nonfinite']['streak'])) == (1, 0)
  assert not np.array_equal(after['params']['conv1']['kernel'],
                            skipped['params']['conv1']['kernel'])


def test_consecutive_nonfinite_steps_stop_with_a_clear_error(tmp_path):
  config = mnist.get_config('tiny')
  config.max_bad_steps, config.log_every = 3, 1
  par, state, step_fn, _, poisoned = _generator_setup(config)
  log = metrics.MetricsLog(str(tmp_path))
  with pytest.raises(errors.NonFiniteError,
                     match=r'generator: 3 consecutive steps up to step 3 .*max_bad_steps=3'):
    runner.run_stage('generator', config, str(tmp_path), par, state, {'teacher': poisoned},
                     step_fn, 6, log, stages.stage_key(config, 'generator'))
  assert [r['skipped_steps'] for r in _rows(tmp_path)] == [1, 2]


def test_workdir_of_another_config_is_refused_unless_overwrite(tmp_path):
  config = mnist.get_config('smoke')
  workdir_lib.prepare_workdir(config, str(tmp_path))
  (tmp_path / 'metrics.jsonl').write_text('{}\n')
  config.log_every = 1  # Changes no result: accepted.
  workdir_lib.prepare_workdir(config, str(tmp_path))
  config.generator.steps, config.seed = 7, 3
  with pytest.raises(config_lib.ConfigError,
                     match="another config .generator.steps: 6 there, 7 now; seed: 0 there, 3 now"):
    workdir_lib.prepare_workdir(config, str(tmp_path))
  workdir_lib.prepare_workdir(config, str(tmp_path), overwrite=True)
  assert not (tmp_path / 'metrics.jsonl').exists()
  assert json.load(open(tmp_path / 'config.json'))['generator']['steps'] == 7


def test_unwritable_workdir_is_a_config_error(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(config_lib.ConfigError, match='cannot write there'):
    workdir_lib.prepare_workdir(mnist.get_config('smoke'), str(tmp_path / 'file' / 'run'))


def test_corrupted_teacher_checkpoint_is_a_config_error(tmp_path):
  bad = tmp_path / 'teacher_variables'
  bad.mkdir()
  (bad / 'garbage').write_text('not a checkpoint')
  config = mnist.get_config('smoke')
  config.teacher.checkpoint = str(bad)
  with pytest.raises(config_lib.ConfigError, match='not a readable lenet5 checkpoint'):
    teacher_lib.restore_teacher(config, models.create_classifier('lenet5', 10), 1)


def test_cli_unwritable_workdir_is_one_line_error(tmp_path):
  (tmp_path / 'file').write_text('')
  result = subprocess.run(
      [sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:smoke',
       f'--workdir={tmp_path}/file/run'], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: workdir '{tmp_path}/file/run': cannot write there (Not a directory); "
      'choose a directory you can write to')
  assert 'Traceback' not in result.stderr
