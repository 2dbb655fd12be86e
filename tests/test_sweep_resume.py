"""A sweep killed (SIGKILL) in the middle of a stage, started from the command line,
resumes through the same stage runner as a single run: every (run, stage, step) row of its
metrics is logged once."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import mnist
from rdskd_jax import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {'generator.steps': 30, 'student.steps': 10, 'checkpoint_every': 8,
             'log_every': 1, 'student.eval_every': 0, 'image_every': 8}


def _command(data_dir, workdir, vmap):
  return ([sys.executable, '-m', 'rdskd_jax.sweep', '--config=configs/mnist.py:tiny',
           f'--config.data_dir={data_dir}', f'--workdir={workdir}', '--seeds=2',
           '--vmap' if vmap else '--novmap'] +
          [f'--config.{k}={v}' for k, v in OVERRIDES.items()])


def _rows(paths):
  rows = []
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        rows += [dict(json.loads(line), file=path) for line in f if line.endswith('\n')]
  return rows


@pytest.mark.parametrize('vmap', [True, False], ids=['vmapped', 'one_by_one'])
def test_sigkill_mid_stage_then_resume_logs_each_row_once(mnist_arrays_dir, tmp_path, vmap):
  if vmap:
    logs = [tmp_path / 'groups' / '0' / 'metrics.jsonl']
  else:
    logs = [tmp_path / 'runs' / str(i) / 'metrics.jsonl' for i in (0, 1)]
  proc = subprocess.Popen(_command(mnist_arrays_dir, tmp_path, vmap), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  # Past the step-8 checkpoint, before the next: rows 9.. are logged twice unless the
  # resume drops them.
  while not any(r['stage'] == 'generator' and r['step'] >= 12 for r in _rows(logs[:1])):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert max(r['step'] for r in _rows(logs[:1]) if r['stage'] == 'generator') < 30
  # The rest in this process, as the command line would run it.
  config = mnist.get_config('tiny')
  config.data_dir = mnist_arrays_dir
  for field, value in OVERRIDES.items():
    parent, _, name = field.rpartition('.')
    (config[parent] if parent else config)[name] = value
  sweep_lib.sweep(config, str(tmp_path), 2, '', vmap=vmap)

  keys = [(r['file'], r.get('run'), r['stage'], r['step']) for r in _rows(logs)]
  repeated = [k for k, n in collections.Counter(keys).items() if n > 1]
  assert not repeated, repeated[:5]
  runs = 2 if vmap else 1  # Vmapped: one file, a `run` field; one by one: a file each.
  for stage, total in (('generator', 30), ('student', 10)):
    for path in logs:
      steps = [r['step'] for r in _rows([path]) if r['stage'] == stage]
      assert sorted(steps) == sorted(list(range(1, total + 1)) * runs), (path, stage)
  sweep = json.load(open(tmp_path / 'sweep.json'))
  assert len(sweep['runs']) == 2
