"""Fused step loops (config.steps_per_call = K > 1): K steps per compiled call compute the
K single steps (float64, where rounding cannot hide a difference), on N devices what one device computes, compile once per call
length, and resume after SIGKILL to the uninterrupted result."""

import os
import signal

import jax
import pytest

from configs import mnist
from rdskd_jax import runner, train

from test_parallel import assert_same_run
from test_reliability import _finish, _rows, _start_and_signal, assert_same_result
import test_reliability


# Periods the calls must end at: logging, checkpoints and reporting (student accuracy,
# generator coverage) every 4 steps. With K = 3 the calls are 3 + 1 + 2 steps.
FUSED = {'generator.steps': 6, 'student.steps': 6, 'dafl.steps': 6, 'log_every': 4,
         'checkpoint_every': 4, 'student.eval_every': 4, 'image_every': 4}


def test_call_lengths_end_at_every_period_and_the_stage_end():
  lengths, step = [], 0
  while step < 20:
    lengths.append(runner.call_length(step, 20, 4, (6, 8, 0)))
    step += lengths[-1]
  assert lengths == [4, 2, 2, 4, 4, 2, 2]  # Ends at 4, 6, 8, 12, 16, 18, 20.
  assert runner.call_length(3, 20, 1, (6,)) == 1
  assert runner.call_length(18, 20, 50, ()) == 2


def _config(data_dir, steps_per_call, parallel='none', num_devices=0, method='rdskd'):
  config = mnist.get_config('tiny')
  config.data_dir, config.dtype = data_dir, 'float64'
  config.parallel, config.num_devices, config.method = parallel, num_devices, method
  config.steps_per_call = steps_per_call
  for field, value in FUSED.items():
    parent, _, name = field.rpartition('.')
    (config[parent] if parent else config)[name] = value
  return config


@pytest.fixture(scope='session')
def shared_teacher(tmp_path_factory, mnist_data_dir):
  """One float64 run at K = 1 on one device; its teacher serves the others."""
  workdir = str(tmp_path_factory.mktemp('k1'))
  with jax.enable_x64(True):
    train.train_and_evaluate(_config(mnist_data_dir, 1), workdir)
  return workdir


@pytest.mark.parametrize('parallel, num_devices', [('none', 0), ('pmap', 4)])
def test_fused_calls_compute_single_steps_in_float64(parallel, num_devices, shared_teacher,
                                                     mnist_data_dir, tmp_path, monkeypatch):
  fuse, traces = runner.fuse_steps, []

  def fuse_counted(step_fn, num_steps):
    """Counts the traces of each fused program (its Python body runs once per trace)."""
    if num_steps == 1:
      return step_fn
    fused, count = fuse(step_fn, num_steps), [num_steps]
    traces.append(count)

    def counted(*args, **kwargs):
      count.append('trace')
      return fused(*args, **kwargs)
    return counted

  monkeypatch.setattr(runner, 'fuse_steps', fuse_counted)
  config = _config(mnist_data_dir, 3, parallel, num_devices)
  config.teacher.checkpoint = os.path.join(shared_teacher, 'teacher_variables')
  with jax.enable_x64(True):
    train.train_and_evaluate(config, str(tmp_path))
  # Generator and student, calls of 3 + 1 + 2 steps: two fused programs each (the single
  # step is the step itself), each traced once.
  assert sorted(traces) == [[2, 'trace'], [2, 'trace'], [3, 'trace'], [3, 'trace']]
  assert_same_run(str(tmp_path), shared_teacher, loss_rtol=1e-6, state_rtol=1e-5,
                  stages=('generator', 'student'))


def test_fused_dafl_computes_single_steps_in_float64(shared_teacher, mnist_data_dir, tmp_path):
  """DAFL's joint steps, 3 + 1 per stage. Float64: in float32 its generator learning rate
  of 0.2 turns the rounding of another program into a coverage entropy 0.09 apart after
  4 steps, so only float64 separates rounding from a real difference."""
  runs = {}
  for k in (1, 3):
    config = _config(mnist_data_dir, k, method='dafl')
    config.dafl.steps = 4
    config.teacher.checkpoint = os.path.join(shared_teacher, 'teacher_variables')
    runs[k] = str(tmp_path / f'k{k}')
    with jax.enable_x64(True):
      train.train_and_evaluate(config, runs[k])
  assert_same_run(runs[3], runs[1], loss_rtol=1e-6, state_rtol=1e-5, stages=('dafl',))


def test_sigkill_during_fused_calls_then_resume(mnist_arrays_dir, tmp_path, monkeypatch):
  """SIGKILL in the generator stage with 3 steps per call and logging every 4 steps: the
  resumed run calls as the uninterrupted one, through both stages, to its result."""
  overrides = {**test_reliability.OVERRIDES, 'log_every': 4, 'image_every': 12,
               'student.eval_every': 12, 'steps_per_call': 3}
  monkeypatch.setattr(test_reliability, 'OVERRIDES', overrides)
  reference = str(tmp_path / 'whole')
  whole = (reference, train.train_and_evaluate(test_reliability._config(mnist_arrays_dir),
                                               reference))
  workdir = tmp_path / 'killed'
  code, _ = _start_and_signal(mnist_arrays_dir, workdir, 'generator', 12, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert max(r['step'] for r in _rows(workdir) if r['stage'] == 'generator') < 40
  _finish(mnist_arrays_dir, workdir)
  assert_same_result(workdir, whole)
