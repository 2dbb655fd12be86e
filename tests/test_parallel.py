"""Data parallelism computes the single-device run: the smoke preset on 1 device (plain jit)
against pmap and shard_map on 2, 4 and 8 fake CPU devices and on 2 processes of 2 devices:
logged losses and final train states equal to rounding. And no step recompiles."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import conftest

from configs import mnist
from rdskd_jax import parallel, train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('teacher', 'generator', 'student')


def _smoke(data_dir, mode, num_devices=0, dtype='float32'):
  config = mnist.get_config('tiny')
  config.data_dir = data_dir
  config.parallel, config.num_devices, config.dtype = mode, num_devices, dtype
  return config


@pytest.fixture(scope='session')
def one_device(tmp_path_factory, mnist_data_dir):
  workdir = str(tmp_path_factory.mktemp('none'))
  train.train_and_evaluate(_smoke(mnist_data_dir, 'none'), workdir)
  return workdir


@pytest.fixture(scope='session')
def one_device_f64(tmp_path_factory, mnist_data_dir):
  workdir = str(tmp_path_factory.mktemp('none64'))
  with jax.enable_x64(True):
    train.train_and_evaluate(_smoke(mnist_data_dir, 'none', dtype='float64'), workdir)
  return workdir


def _metrics(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {(r.pop('stage'), r.pop('step')): r for r in rows}


def _final_state(workdir, stage):
  directory = os.path.join(workdir, 'checkpoints', stage)
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  return ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), 'default'))


def assert_same_run(workdir, reference, loss_rtol, state_rtol, accuracy_atol=3e-4,
                    stages=STAGES):
  """Every logged loss of `stages` within `loss_rtol` relative, and every leaf of every
  stage's final train state (parameters, BatchNorm statistics, Adam moments, loss
  references, step) within `state_rtol` of its norm; in float64 compute also elementwise
  to 1e-4.

  `state_rtol` is a number, or {stage: rtol} for the stages whose states are compared.
  Accuracies count argmax decisions, and the smoke student (near chance) has many near
  ties among the 10,000 test images: they may differ by `accuracy_atol`. The generator's
  diagnostics count as the generator's.
  """
  if not isinstance(state_rtol, dict):
    state_rtol = dict.fromkeys(stages, state_rtol)
  logged = set(stages) | ({'diagnostics'} if 'generator' in stages else set())
  got, want = _metrics(workdir), _metrics(reference)
  got, want = ({k: v for k, v in m.items() if k[0] in logged} for m in (got, want))
  assert want and got.keys() == want.keys()
  for key, row in want.items():
    assert got[key].keys() == row.keys(), key
    for name, value in row.items():
      if key[0] == 'diagnostics':
        # Reporting statistics of 4k samples (a Frechet distance of features): a function
        # of the final generator, compared to 5% (rounding in float32, ~1e-7 in float64).
        np.testing.assert_allclose(got[key][name], value, rtol=0.05, atol=1e-6,
                                   err_msg=f'{key} {name}')
      elif 'accuracy' in name:
        assert abs(got[key][name] - value) <= accuracy_atol + 1e-9, (key, name, got[key][name],
                                                                     value)
      else:
        np.testing.assert_allclose(got[key][name], value, rtol=loss_rtol, atol=1e-9,
                                   err_msg=f'{key} {name}')
  for stage, rtol in state_rtol.items():
    got_state, want_state = _final_state(workdir, stage), _final_state(reference, stage)
    if rtol <= 1e-5:
      chex.assert_trees_all_close(got_state, want_state, rtol=1e-4, atol=1e-4)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_state)[0],
                            jax.tree.leaves(want_state)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b) + 1e-12, (stage, path)


def assert_same_run_float64(workdir, one_device_f64, data_dir, overrides=()):
  """A float64 run equals the one-device run: the teacher stage compared with
  `one_device_f64`, the generator and student stages with a one-device run from the
  teacher that `workdir` trained (written next to it, with the `overrides` (field, value)
  of the run), each to 1e-6 (losses) and 1e-5 (states).

  Parameters and Adam moments stay float32, so two float64 runs of the teacher can
  still differ in the last bit of a few of them (~1e-7 of a leaf's norm), and the smoke
  generator's first Adam steps on batch 16 amplify any such difference through the
  BatchNorm biases' nearly cancelling gradients (see the float32 test below). Measured on
  two processes: from their own teacher, ~4e-4 of the generator's Adam moments and 3e-6
  of its losses after 6 steps; from the same teacher, 2e-7 of the moments.
  """
  assert_same_run(workdir, one_device_f64, loss_rtol=1e-6, state_rtol=1e-5,
                  stages=('teacher',))
  config = _smoke(data_dir, 'none', dtype='float64')
  for field, value in overrides:
    parent, _, name = field.rpartition('.')
    (config[parent] if parent else config)[name] = value
  config.teacher.checkpoint = os.path.join(workdir, 'teacher_variables')
  reference = f'{workdir}_reference'
  with jax.enable_x64(True):
    train.train_and_evaluate(config, reference)
  assert_same_run(workdir, reference, loss_rtol=1e-6, state_rtol=1e-5,
                  stages=('generator', 'student'))


def one_and_two_devices_in_float64(make_config, tmp_path, stage):
  """A method's tiny run in float64 on one device (figures drawn), then on 2 devices (pmap)
  from its teacher, compared in `stage`; returns the one-device run's report (its
  workdir: `tmp_path / 'one'`)."""
  with jax.enable_x64(True):
    one = make_config(parallel='none', dtype='float64', figures=True)
    report = train.train_and_evaluate(one, str(tmp_path / 'one'))
    two = make_config(parallel='pmap', num_devices=2, dtype='float64')
    two.teacher.checkpoint = str(tmp_path / 'one' / 'teacher_variables')
    train.train_and_evaluate(two, str(tmp_path / 'two'))
  assert_same_run(str(tmp_path / 'two'), str(tmp_path / 'one'), loss_rtol=1e-6,
                  state_rtol=1e-5, stages=(stage,))
  return report


# float64 compute (parameters stay float32): the data-parallel run is the one-device run.
@pytest.mark.parametrize('mode, num_devices', [('pmap', 2), ('shard_map', 4)])
def test_data_parallel_run_equals_one_device_in_float64(mode, num_devices, one_device_f64,
                                                        mnist_data_dir, tmp_path):
  with jax.enable_x64(True):
    report = train.train_and_evaluate(_smoke(mnist_data_dir, mode, num_devices, 'float64'),
                                      str(tmp_path / 'run'))
  assert (report['parallel'], report['devices'], report['processes']) == (mode, num_devices, 1)
  assert_same_run_float64(str(tmp_path / 'run'), one_device_f64, mnist_data_dir)


# float32: the same up to float32 rounding, which a few gradients amplify. The biases of
# the BatchNorms before a bias-free conv and another BatchNorm get a gradient that nearly
# cancels (only the conv's zero-padded border survives the second BatchNorm), so its
# relative rounding error is ~1e-3, and Adam, which divides by the gradient's magnitude,
# passes that on to the update; the generator's samples move a little, and the student
# trained on them with them. Measured over the smoke run (batch 16, six Adam steps from
# scratch, the most sensitive phase): generator losses up to 1e-3 relative, the student's
# KD loss up to 1e-2, those biases up to 1e-2 of their norm, the student's Adam moments
# up to 6e-2, the teacher's up to 2e-4. So in float32 the teacher's state is compared
# to 1e-3, the generator's loosely, the student's through its losses; the float64 tests
# show that nothing but rounding differs.
@pytest.mark.parametrize('mode', ['pmap', 'shard_map'])
def test_eight_devices_equal_one_device_in_float32(mode, one_device, mnist_data_dir, tmp_path,
                                                   monkeypatch):
  chex.clear_trace_counter()
  wrap, traced = parallel.DataParallel.wrap, []

  def wrap_counted(self, step_fn, num_batch_args=0):
    """chex.assert_max_traces(n=1) on every step the stages wrap: a whole run (with
    logging, checkpoints and evaluation between steps) never retraces a step."""
    traced.append(chex.assert_max_traces(step_fn.func, n=1))  # teacher_step, ...
    counted = functools.partial(traced[-1], *step_fn.args, **step_fn.keywords)
    return wrap(self, counted, num_batch_args)

  monkeypatch.setattr(parallel.DataParallel, 'wrap', wrap_counted)
  report = train.train_and_evaluate(_smoke(mnist_data_dir, mode, 8), str(tmp_path))
  assert len(traced) == 3  # teacher, generator, student
  assert (report['parallel'], report['devices'], report['processes']) == (mode, 8, 1)
  assert_same_run(str(tmp_path), one_device, loss_rtol=3e-2,
                  state_rtol={'teacher': 1e-3, 'generator': 5e-2}, accuracy_atol=3e-3)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_trace_counter_catches_a_retrace():
  """The check above can fail: a step called with a new shape traces again."""
  chex.clear_trace_counter()
  step = chex.assert_max_traces(lambda x: x * 2, n=1)
  jitted = jax.jit(step)
  jitted(np.zeros(2))
  with pytest.raises(AssertionError):
    jitted(np.zeros(3))


# A generator stage long enough to stop in (the signal comes after step 9; a step of the
# two processes over gloo takes about 0.3 s); the processes look for SIGTERM every
# log_every (2) steps, and checkpoint every 16 but where they stop.
PREEMPTION = (('generator.steps', 20), ('checkpoint_every', 16))


def _two_processes(data_dir, workdir, port):
  procs = []
  for pid in range(2):
    env = dict(os.environ, RDSKD_DISTRIBUTED='1', JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(pid),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_ENABLE_X64='1',
               XLA_FLAGS=conftest.xla_flags(2))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:tiny',
         f'--config.data_dir={data_dir}', f'--workdir={workdir}', '--config.dtype=float64'] +
        [f'--config.{field}={value}' for field, value in PREEMPTION],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def test_two_processes_stop_together_and_equal_one_device(one_device_f64, mnist_data_dir,
                                                         mnist_arrays_dir, tmp_path):
  """jax.distributed on CPU, through the command line as a pod slice runs it: 2 processes x
  2 devices, collectives over gloo, float64 compute. Orbax saves are collective: a SIGTERM
  that reaches only process 1 stops both at the same checkpointed step (not a hang), only
  process 0 reports, and the resumed run equals the one-device run. Both starts read each
  process's share from exported arrays (no TensorFlow to import); that a share read
  through tfds is the same is tests/test_data.py's."""
  workdir = tmp_path / 'run'
  procs = _two_processes(mnist_arrays_dir, workdir, _free_port())
  deadline = time.time() + 600
  while not any(r['stage'] == 'generator' and r['step'] >= 9 for r in
                _rows_if_any(workdir / 'metrics.jsonl')):
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  steps = []
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 143, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith('stopped: generator: stopped by SIGTERM after step '), line
    steps.append(int(line.split('after step ')[1].split('/')[0]))
  assert steps[0] == steps[1] and steps[0] % 2 == 0 and steps[0] < 20
  assert str(steps[0]) in os.listdir(workdir / 'checkpoints' / 'generator')

  outputs = _finish_all(_two_processes(mnist_arrays_dir, workdir, _free_port()))
  assert '[student] test accuracy' in outputs[0][1]
  assert '[student]' not in outputs[1][1]  # Only process 0 reports.
  report = json.load(open(workdir / 'report.json'))
  assert (report['devices'], report['processes']) == (4, 2)
  assert_same_run_float64(str(workdir), one_device_f64, mnist_data_dir, PREEMPTION)


def _finish_all(procs):
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def _rows_if_any(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]
