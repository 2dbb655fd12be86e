"""The student's bank (student.reuse > 1): reuse 1 is the stage as it was, the bank's
stage on N devices and in fused calls computes what one device's single steps compute,
an interrupted stage resumes to the uninterrupted result, and a trained generator is
reused (generator.checkpoint) or refused in one line.

The step-level tests run the student stage alone (`runner.run_stage`) on the tiny
preset's networks at their initial weights, in float64: what they check does not need
trained networks, and they compile in seconds."""

import ast
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import mnist
from rdskd_jax import bank, metrics, parallel, runner, stages, train, train_steps
from rdskd_jax.errors import ConfigError
from rdskd_jax.methods import rdskd

from test_reliability import _rows, assert_same_result, tiny_config


# The reuse=1 student stage of `_student_stage(reuse=1)`, recorded from the code before
# the bank existed (commit 2a5d5e0, `python tests/test_bank.py`): the KD loss at steps 2,
# 4 and 6, and the sum and the sum of squares of the student's parameters after step 6.
REUSE_ONE = {'kd': [0.0034575249001945283, 0.002481889926244502, 0.0016643464902364406],
             'sum': -1.9371042251586914, 'sum_of_squares': 41.613731384277344}


def _config(reuse=1, bank_size=0, parallel_mode='none', num_devices=0, steps_per_call=1):
  config = mnist.get_config('tiny')
  config.dtype = 'float64'
  config.student.reuse, config.student.bank_size = reuse, bank_size
  config.parallel, config.num_devices = parallel_mode, num_devices
  config.steps_per_call = steps_per_call
  config.student.eval_every = 0
  return config


def _networks(config):
  """The tiny networks and the teacher's and generator's initial variables."""
  teacher, generator, student = stages.build_networks(config, 10, 1)
  params, collections = train_steps.classifier_init(teacher, stages.init_key(config, 'teacher'),
                                                    (32, 32, 1))
  generator_vars = train_steps.init_variables(generator, stages.init_key(config, 'generator'),
                                              np.zeros((2, config.generator.latent_dim)))
  return (teacher, generator, student,
          {'teacher': {'params': params, **collections}, 'generator': generator_vars})


def _student_stage(workdir, config, total=None, fail_after=None):
  """The student stage of `config` in `workdir` (resuming its checkpoints); the host state
  and the metrics.jsonl rows. `fail_after`: raise (as a process killed there would stop)
  after that step, before any checkpoint of it."""
  teacher, generator, student, frozen = _networks(config)
  par = parallel.DataParallel(config.parallel, config.num_devices)
  state, step_fn = rdskd.student_setup(config, 1, 10, generator, teacher, student)
  extra = {}
  if config.student.reuse > 1:
    extra['derived'] = bank.derived(config, generator, teacher)
  if fail_after:
    def report_fn(state):
      raise KeyboardInterrupt(f'stopped after step {int(state["step"])}')
    extra.update(report_fn=report_fn, report_every=fail_after)
  os.makedirs(workdir, exist_ok=True)
  state, _ = runner.run_stage('student', config, workdir, par, state, frozen, step_fn,
                              total or config.student.steps, metrics.MetricsLog(workdir),
                              stages.stage_key(config, 'student'), **extra)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return state, rows


def _summary(state, rows):
  leaves = jax.tree.leaves(state['params'])
  return {'kd': [r['kd'] for r in rows],
          'sum': float(sum(np.sum(x) for x in leaves)),
          'sum_of_squares': float(sum(np.sum(np.square(x)) for x in leaves))}


def _assert_same_state(a, b, rtol):
  """Every entry of two host states (parameters, optimizer, bank) within `rtol` of its
  norm, as test_parallel.assert_same_run compares states; rtol 0: the same bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if rtol == 0:
      np.testing.assert_array_equal(x, y)
    assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y) + 1e-12


def test_reuse_one_is_the_stage_as_it_was(tmp_path):
  """Same noise, same batches, same steps. Recorded in float64 compute (float32
  parameters); the same machine gives the same bits, and the tolerance leaves room for
  another CPU's rounding of a parameter. A change of the path moves these values far
  beyond it: each step's noise drawn from the next step's key moves the KD loss by 1e-3
  (tests/README.md)."""
  with jax.enable_x64(True):
    state, rows = _student_stage(str(tmp_path), _config(reuse=1))
  assert 'bank' not in state
  got = _summary(state, rows)
  for name, value in REUSE_ONE.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-6)


@pytest.fixture(scope='module')
def one_device_bank(tmp_path_factory):
  """The bank's stage (reuse 4: 4 fresh images a step of 16; a bank of 3 blocks, so that
  6 steps go round it twice) on one device, one step per call."""
  workdir = str(tmp_path_factory.mktemp('bank1'))
  with jax.enable_x64(True):
    return _student_stage(workdir, _config(reuse=4, bank_size=12))


def test_the_bank_is_filled_used_and_refreshed(one_device_bank):
  state, rows = one_device_bank
  bank = state['bank']
  assert bank['images'].shape == (12, 32, 32, 1) and bank['logits'].shape == (12, 10)
  assert np.all(np.isfinite(bank['images'])) and np.all(np.any(bank['images'] != 0, (1, 2, 3)))
  assert len({float(np.sum(x)) for x in bank['images']}) == 12  # No two images alike.
  assert [r['step'] for r in rows] == [2, 4, 6] and all(np.isfinite(r['kd']) for r in rows)


@pytest.mark.parametrize('mode, devices, steps_per_call', [
    ('pmap', 4, 1), ('shard_map', 2, 1), ('none', 0, 4)])
def test_the_bank_on_n_devices_and_in_fused_calls_equals_single_steps(
    mode, devices, steps_per_call, one_device_bank, tmp_path):
  """Each device makes its share of the fresh images and draws its rows of the global
  batch; fused calls of 4 steps (then 2) cross the ring's wrap at step 3."""
  with jax.enable_x64(True):
    state, rows = _student_stage(str(tmp_path), _config(4, 12, mode, devices, steps_per_call))
  reference, reference_rows = one_device_bank
  # Parameters and Adam's moments are float32 (as in every float64 test, test_parallel.py):
  # rounding, not a difference in what is computed, stays within these tolerances.
  _assert_same_state(state, reference, rtol=1e-5)
  np.testing.assert_allclose([r['kd'] for r in rows], [r['kd'] for r in reference_rows],
                             rtol=1e-6)


def test_an_interrupted_bank_stage_resumes_to_the_same_result(one_device_bank, tmp_path):
  """Stopped at step 5, its last checkpoint step 4's (the ring a block past its first
  round), then run
  again: the bank is made again from the step, bit for bit, and the result is the
  uninterrupted one."""
  config = _config(reuse=4, bank_size=12)
  config.checkpoint_every = 4
  with jax.enable_x64(True):
    with pytest.raises(KeyboardInterrupt):
      _student_stage(str(tmp_path), config, fail_after=5)
    deadline = time.time() + 60  # Step 4's checkpoint, saved asynchronously, completes.
    while not os.path.isdir(tmp_path / 'checkpoints' / 'student' / '4'):
      assert time.time() < deadline
      time.sleep(0.05)
    with open(tmp_path / 'checkpoints' / 'student' / '4' / 'default' / '_METADATA') as f:
      # Orbax's metadata names each saved leaf by its path, a tuple written as text.
      saved = {ast.literal_eval(path)[0] for path in json.load(f)['tree_metadata']}
    assert 'params' in saved and 'bank' not in saved  # Made again from the step, not saved.
    state, rows = _student_stage(str(tmp_path), config)
  reference, reference_rows = one_device_bank
  _assert_same_state(state, reference, rtol=0)
  assert rows == reference_rows


# The tiny preset with the bank: 4 fresh images a step of 16, a bank of 32 (8 steps round).
# 32 steps: the kill after step 9 lands well before the end on a busy machine.
BANK_RUN = {'parallel': 'none', 'student.reuse': 4, 'student.bank_size': 32,
            'student.steps': 32, 'checkpoint_every': 4, 'log_every': 1,
            'student.eval_every': 0}


def _bank_run_config(data_dir):
  return tiny_config(data_dir, BANK_RUN)


def test_sigkill_in_the_bank_stage_then_resume(pipeline_run, mnist_arrays_dir, tmp_path):
  """The command line killed by SIGKILL in the bank's stage, after its checkpoint of step
  8, then resumed (in this process): every logged step and the result equal the
  uninterrupted run's, the bank made again from the step."""
  workdir = tmp_path / 'killed'
  command = [sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:tiny',
             f'--workdir={workdir}', f'--config.data_dir={mnist_arrays_dir}',
             *(f'--config.{k}={v}' for k, v in BANK_RUN.items())]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The test process's XLA flags (8 devices): the program compiles as the reference's did.
  process = subprocess.Popen(command, cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(r['stage'] == 'student' and r['step'] >= 9 for r in _rows(workdir)):
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert max(r['step'] for r in _rows(workdir) if r['stage'] == 'student') < 32
  train.train_and_evaluate(_bank_run_config(mnist_arrays_dir), str(workdir))
  assert_same_result(workdir, (pipeline_run['workdir'], pipeline_run))
  with open(workdir / 'report.json') as f:
    report = json.load(f)['student']
  assert (report['reuse'], report['bank_size']) == (4, 32)
  assert report['bank_bytes'] == 32 * (32 * 32 + 10) * 4  # float32 images and logits.


@pytest.fixture(scope='module')
def pipeline_run(tmp_path_factory, mnist_data_dir):
  """The tiny preset with the bank (BANK_RUN), uninterrupted, in this process."""
  workdir = str(tmp_path_factory.mktemp('pipeline'))
  report = train.train_and_evaluate(_bank_run_config(mnist_data_dir), workdir)
  return dict(report, workdir=workdir)


def test_a_trained_generator_is_reused_and_refused(pipeline_run, mnist_data_dir, tmp_path):
  """Its teacher and generator from another run's workdir: the generator stage is
  skipped, and the student is the one that run trained (same teacher, generator, seed).
  Another teacher, other generator settings or no generator there: one line each."""
  first = pipeline_run['workdir']
  config = _bank_run_config(mnist_data_dir)
  config.teacher.checkpoint = os.path.join(first, 'teacher_variables')
  config.generator.checkpoint = os.path.join(first, 'generator_variables')
  config.generator.steps = 1  # Not run: the generator comes from the checkpoint.
  report = train.train_and_evaluate(config, str(tmp_path / 'reused'))
  assert report['generator']['checkpoint'] == config.generator.checkpoint
  assert report['generator']['fingerprint'] == pipeline_run['generator']['fingerprint']
  assert report['generator']['steps'] == 6 and report['generator']['seconds'] == 0.0
  assert not os.path.exists(tmp_path / 'reused' / 'checkpoints' / 'generator')
  assert report['student']['test_accuracy'] == pipeline_run['student']['test_accuracy']

  other_teacher = tmp_path / 'other_teacher'
  other = config.copy_and_resolve_references()
  other.seed = 1
  other.teacher.checkpoint = ''
  other.generator.checkpoint = ''
  other.student.steps = other.generator.steps = 2
  train.train_and_evaluate(other, str(other_teacher))
  cases = [
      (dict(teacher=str(other_teacher / 'teacher_variables')), 'trained against another teacher'),
      (dict(latent_dim=50), 'a generator of other settings (latent_dim 100 there, 50 here)'),
      (dict(generator=str(tmp_path)), 'no generator there'),
  ]
  for change, message in cases:
    bad = config.copy_and_resolve_references()
    bad.teacher.checkpoint = change.get('teacher', bad.teacher.checkpoint)
    bad.generator.checkpoint = change.get('generator', bad.generator.checkpoint)
    bad.generator.latent_dim = change.get('latent_dim', bad.generator.latent_dim)
    with pytest.raises(ConfigError, match='^config.generator.checkpoint=.*') as error:
      train.train_and_evaluate(bad, str(tmp_path / 'bad'), overwrite=True)
    assert message in str(error.value) and '\n' not in str(error.value)


if __name__ == '__main__':  # Prints REUSE_ONE from this checkout's code.
  import tempfile
  jax.config.update('jax_enable_x64', True)
  with tempfile.TemporaryDirectory() as directory:
    print(json.dumps(_summary(*_student_stage(directory, _config(reuse=1)))))
