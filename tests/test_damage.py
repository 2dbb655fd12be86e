"""Workdirs that survive damage: each test makes the damage itself, and the run either
ends in the uninterrupted result or stops with one line (exit 2 on the command line)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mnist
from rdskd_jax import (config_checks, errors, metrics, models, parallel, plot, runner,
                       stages, train, train_steps)
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.methods import rdskd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Values.

@pytest.mark.parametrize('field, value', [('generator.learning_rate', float('inf')),
                                          ('student.temperature', float('inf')),
                                          ('dafl.alpha', float('nan'))])
def test_non_finite_numbers_are_config_errors(field, value):
  config = mnist.get_config('smoke')
  parent, name = field.split('.')
  config[parent][name] = value
  with pytest.raises(errors.ConfigError, match=rf'^config\.{field}={value!r}: expected a '
                     'finite number$'):
    config_checks.validate(config)


def test_non_finite_mean_is_a_config_error():
  config = mnist.get_config('smoke')
  config.mean = (float('nan'),)
  with pytest.raises(errors.ConfigError, match=r'^config\.mean=\(nan,\): expected a finite'):
    config_checks.validate(config)


def test_too_small_images_name_the_smallest_size_that_works():
  config = mnist.get_config('smoke')
  config.image_size = 8
  config_checks.validate(config)  # A multiple of 4: only the networks can tell.
  with pytest.raises(errors.ConfigError, match=r"^config\.image_size=8: expected at least 32 "
                     r"for teacher 'lenet5'"):
    stages.build_networks(config, 10, 1)
  config.teacher.model = config.student.model = 'wrn_16_1'  # Global pooling: 8 works.
  stages.build_networks(config, 10, 1)


def test_a_step_whose_update_is_not_finite_is_skipped():
  params = {'w': jnp.ones(3)}
  tx = optax.sgd(float('inf'))
  state = train_steps.new_train_state(params, tx)
  grads = {'w': jnp.full(3, 0.5)}  # Finite gradients; the infinite rate breaks the update.
  new = train_steps.apply_gradients(state, grads, tx, None, jnp.float32(1.0))
  np.testing.assert_array_equal(new['params']['w'], params['w'])
  assert (int(new['nonfinite']['total']), int(new['nonfinite']['streak'])) == (1, 1)
  assert int(new['step']) == 1


def _mostly_skipped_step(state, frozen, root_key, axis_name=None):
  """Two of every three steps skipped: never max_bad_steps in a row."""
  del frozen, root_key, axis_name
  bad = (state['step'] % 3 != 0).astype(jnp.int32)
  seen = state['nonfinite']
  return ({'step': state['step'] + 1, 'nonfinite': {
      'total': seen['total'] + bad, 'streak': jnp.where(bad > 0, seen['streak'] + 1, 0)}},
          {'loss': jnp.float32(0.0)})


def test_a_stage_with_most_steps_skipped_is_an_error(tmp_path):
  config = mnist.get_config('smoke')
  config.log_every = 4
  state = {'step': jnp.int32(0), 'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}}
  with pytest.raises(errors.NonFiniteError, match=r'^generator: 8 of its 12 steps had a '
                     'non-finite loss, gradient or update and were skipped'):
    runner.run_stage('generator', config, str(tmp_path), parallel.DataParallel('none'), state,
                     {}, _mostly_skipped_step, 12, metrics.MetricsLog(str(tmp_path)),
                     jax.random.key(0))


# Checkpoints.

def _generator_stage(config, workdir, total):
  teacher = models.create_classifier('lenet5', 10)
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
  generator = models.Generator(width=config.generator.width)
  state, step_fn = rdskd.generator_setup(config, generator, teacher)
  state, _ = runner.run_stage('generator', config, str(workdir), parallel.DataParallel('none'),
                              state, {'teacher': teacher_vars}, step_fn, total,
                              metrics.MetricsLog(str(workdir)),
                              stages.stage_key(config, 'generator'))
  return state


def _truncate_files(path):
  for folder, _, files in os.walk(path):
    for name in files:
      file = os.path.join(folder, name)
      with open(file, 'r+b') as f:
        f.truncate(os.path.getsize(file) // 2)


def _remove_metadata(path):
  for folder, _, files in os.walk(path):
    for name in files:
      if name == '_METADATA':
        os.remove(os.path.join(folder, name))


@pytest.mark.parametrize('damage', [_truncate_files, _remove_metadata])
def test_an_unreadable_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, capsys,
                                                                       damage):
  config = mnist.get_config('tiny')
  config.checkpoint_every, config.log_every = 4, 2
  expected = _generator_stage(config, tmp_path / 'whole', 12)

  _generator_stage(config, tmp_path / 'damaged', 8)  # Checkpoints at steps 4 and 8.
  latest = tmp_path / 'damaged' / 'checkpoints' / 'generator' / '8'
  damage(latest)
  capsys.readouterr()
  resumed = _generator_stage(config, tmp_path / 'damaged', 12)
  lines = [l for l in capsys.readouterr().err.splitlines() if 'cannot be read' in l]
  assert len(lines) == 1 and lines[0].startswith(f'[generator] checkpoint {latest} cannot be '
                                                 'read (')
  assert lines[0].endswith('set aside as 8.damaged, trying the one before')
  assert (latest.parent / '8.damaged').is_dir()
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)
  rows = [(r['stage'], r['step']) for r in metrics.read_rows(tmp_path / 'damaged' /
                                                             'metrics.jsonl')]
  assert rows == [('generator', s) for s in range(2, 13, 2)]  # Each row once.


# Logs and JSON files.

def _write_rows(path, rows, tail=''):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write(tail)


def test_a_cut_last_line_of_metrics_is_dropped_on_resume(tmp_path, capsys):
  rows = [{'stage': 'generator', 'step': s, 'loss': 1.0} for s in (2, 4)]
  _write_rows(tmp_path / 'metrics.jsonl', rows, '{"stage": "generator", "st')
  log = metrics.MetricsLog(str(tmp_path))
  log.resume('generator', 4)
  assert 'dropped its last line, cut short' in capsys.readouterr().err
  assert (tmp_path / 'metrics.jsonl').read_text().splitlines() == [json.dumps(r) for r in rows]
  log.write('generator', 6, {'loss': np.float32(2.0)})
  assert [r['step'] for r in metrics.read_rows(str(tmp_path / 'metrics.jsonl'))] == [2, 4, 6]


def test_a_damaged_line_inside_metrics_is_a_data_error(tmp_path):
  _write_rows(tmp_path / 'metrics.jsonl', [{'stage': 'teacher', 'step': 1}], 'garbage\n')
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'stage': 'teacher', 'step': 2}) + '\n')
  with pytest.raises(errors.DataError, match=r'metrics.jsonl: line 2 of 3 is not JSON'):
    metrics.read_rows(str(tmp_path / 'metrics.jsonl'))


def test_plotting_reads_metrics_with_a_cut_last_line(tmp_path):
  rows = [{'stage': 'generator', 'step': s, 'total': 1.0 / s} for s in (2, 4)]
  rows += [{'stage': 'student', 'step': s, 'kd': 1.0 / s} for s in (2, 4)]
  _write_rows(tmp_path / 'metrics.jsonl', rows, '{"stage": "stu')
  assert os.path.exists(plot.save_curves(str(tmp_path)))


def test_a_damaged_report_is_set_aside_and_rebuilt(tmp_path, capsys):
  (tmp_path / 'report.json').write_text('{"teacher": {"seconds": 3')
  report = train.Report(str(tmp_path))
  assert report.content == {}
  assert 'was damaged (not JSON), set aside as report.json.damaged' in capsys.readouterr().err
  assert (tmp_path / 'report.json.damaged').read_text() == '{"teacher": {"seconds": 3'
  report.add('teacher', {'seconds': 1.0})
  assert json.load(open(tmp_path / 'report.json')) == {'teacher': {'seconds': 1.0}}


def test_a_damaged_config_json_is_a_one_line_error_unless_overwrite(tmp_path):
  config = mnist.get_config('smoke')
  (tmp_path / 'config.json').write_text('{"seed": ')
  (tmp_path / 'metrics.jsonl').write_text('{}\n')
  with pytest.raises(errors.ConfigError, match=r'config.json is damaged \(not JSON: .*\); '
                     'restore it, or run with --overwrite'):
    workdir_lib.prepare_workdir(config, str(tmp_path))
  workdir_lib.prepare_workdir(config, str(tmp_path), overwrite=True)
  assert not (tmp_path / 'metrics.jsonl').exists()
  assert json.load(open(tmp_path / 'config.json'))['seed'] == config.seed


def test_plot_of_a_damaged_report_is_one_line_and_exit_2(tmp_path):
  _write_rows(tmp_path / 'metrics.jsonl', [{'stage': 'generator', 'step': 2, 'total': 1.0}])
  (tmp_path / 'report.json').write_text('not json')
  result = subprocess.run([sys.executable, '-m', 'rdskd_jax.plot', f'--workdir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: {tmp_path}/report.json is damaged (not JSON: ')
  assert 'Traceback' not in result.stderr


# One run per workdir.

_HOLD_LOCK = ('import sys, time; from rdskd_jax import workdir; '
              'lock = workdir.WorkdirLock(sys.argv[1]).__enter__(); print("held", flush=True); '
              'time.sleep(600)')


def _hold_lock(path):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  return holder


def test_a_second_run_on_a_locked_workdir_is_one_line_and_exit_2(tmp_path):
  holder = _hold_lock(tmp_path)
  try:
    result = subprocess.run(
        [sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:smoke',
         f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir '{tmp_path}' is in use by another run (pid {holder.pid} on ")
  assert 'Traceback' not in result.stderr


def test_the_lock_of_a_killed_run_is_not_stale(tmp_path):
  holder = _hold_lock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(errors.ConfigError, match='is in use by another run'):
      with workdir_lib.WorkdirLock(str(tmp_path)):
        pass
  with workdir_lib.WorkdirLock(str(tmp_path)):  # Released on exit.
    time.sleep(0)


# The filesystem.

# Writes past 100 kB then fail with EFBIG, as on a full disk they fail with ENOSPC; set in
# a small launcher that then executes the command (no fork of the threaded test process).
_WITH_FILE_SIZE_LIMIT = ('import os, resource, signal, sys; '
                         'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
                         'resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); '
                         'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')


def test_a_failed_checkpoint_write_is_one_line_and_exit_2(mnist_arrays_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', _WITH_FILE_SIZE_LIMIT, '-m', 'rdskd_jax.main',
       '--config=configs/mnist.py:tiny', f'--config.data_dir={mnist_arrays_dir}',
       f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: writing teacher checkpoints (by step 8) to {tmp_path}/checkpoints/teacher '
      'failed (File too large); fix that, then run the same command again to resume')
  assert 'Traceback' not in result.stderr


def test_asyncio_reports_of_orbax_write_tasks_are_dropped():
  """After a failed write, asyncio logs 'Task exception was never retrieved' for Orbax's
  write task when the task is collected, which can be after the run's error line (seen
  once in the test above): the one-line filter drops it, and keeps asyncio's other lines."""
  one_line = errors._OneLineLogs()

  def record(coroutine_file):
    return logging.getLogger('asyncio').makeRecord(
        'asyncio', logging.ERROR, '/usr/lib/python3.11/asyncio/base_events.py', 1818,
        "Task exception was never retrieved\nfuture: <Task finished name='Task-23' "
        f"coro=<NumpyHandler._open_and_write() done, defined at {coroutine_file}:114> "
        "exception=ValueError('OUT_OF_RANGE: Error writing')>", (), None)
  orbax_file = os.path.join(os.sep, 'venv', 'orbax', 'checkpoint', 'type_handlers.py')
  assert not one_line.filter(record(orbax_file))
  assert one_line.filter(record(os.path.join(os.sep, 'venv', 'other', 'module.py')))


def _can_mount_tmpfs():
  """Whether this process may mount a tmpfs in a mount namespace of its own (root, with
  unshare): then nothing outside sees it, and it goes away with the process."""
  if os.geteuid() != 0 or shutil.which('unshare') is None:
    return False
  probe = subprocess.run(['unshare', '-m', 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /mnt'],
                         capture_output=True)
  return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(),
                    reason='a real full disk needs a small tmpfs: root and unshare -m (CI '
                           'runs as root); the test above covers a failed write without one')
def test_a_full_disk_is_one_line_and_exit_2(mnist_arrays_dir, tmp_path):
  """A 1 MB tmpfs as the workdir fills during the teacher's checkpoints: exit 2 and the
  run's own line, not Orbax's lines about the failed write (those are for --verbose)."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  result = subprocess.run(
      ['unshare', '-m', 'sh', '-c', f'mount -t tmpfs -o size=1m tmpfs {disk} && exec "$@"',
       'sh', sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:tiny',
       f'--config.data_dir={mnist_arrays_dir}', f'--workdir={disk}/run'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (f'error: writing teacher checkpoints to {disk}/run/checkpoints/teacher '
                       'failed (No space left on device); the disk is full: free space, then '
                       'run the same command again to resume')
  assert not [line for line in lines[:-1] if 'No space left' in line or
              'RESOURCE_EXHAUSTED' in line], lines[:-1]
