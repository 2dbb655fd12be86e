"""The robustness sweep: grid parsing, a well-formed sweep.json on the smoke preset, and
the vmapped sweep computing what separate runs compute."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rdskd_jax import config_lib, sweep


# One setting off the config's learning rate (1e-3), so every run scales its updates.
GRID = 'generator.learning_rate=2e-3'


def test_parse_grid_is_a_cartesian_product():
  assert sweep.parse_grid('a=1,2;b=x') == [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]
  assert sweep.parse_grid('') == [{}]
  assert sweep.parse_grid('a=1,2;b=x|a=1|c=3') == [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'},
                                                   {'a': 1}, {'c': 3}]
  assert sweep.parse_grid('a=1|a=1,2') == [{'a': 1}, {'a': 2}]  # Each setting once.
  with pytest.raises(config_lib.ConfigError, match="--grid clause 'a': expected field="):
    sweep.parse_grid('a')


def test_vmap_default_depends_on_platform():
  assert not sweep.use_vmap(None, 'cpu')
  assert sweep.use_vmap(None, 'gpu') and sweep.use_vmap(None, 'tpu')
  assert sweep.use_vmap(True, 'cpu') and not sweep.use_vmap(False, 'gpu')


def test_runs_group_by_shape():
  from configs import mnist
  runs = sweep.run_configs(mnist.get_config('smoke'), 2,
                           sweep.parse_grid('student.learning_rate=1e-3,2e-3;'
                                            'student.batch_size=16,32'))
  assert len(runs) == 8 and [seed for _, seed, _ in runs[:2]] == [0, 1]
  assert len({sweep.group_key(c) for _, _, c in runs}) == 2  # One per batch size.


@pytest.fixture(scope='session')
def sweeps(tmp_path_factory, mnist_data_dir):
  """2 seeds, vmapped and one by one, in float64 compute: float32
  rounding differs between a batched and a single program, and Adam, which divides by
  the gradient's running magnitude, amplifies it in near-zero parameters (up to 1e-4
  after 6 steps); float64 separates that from a real difference."""
  from configs import mnist
  config = mnist.get_config('tiny')
  config.data_dir = mnist_data_dir
  config.dtype = 'float64'
  root = tmp_path_factory.mktemp('sweep')
  with jax.enable_x64(True):
    vmapped = sweep.sweep(config, str(root / 'vmap'), 2, GRID, vmap=True)
    config.teacher.checkpoint = str(root / 'vmap' / 'teacher' / 'teacher_variables')
    looped = sweep.sweep(config, str(root / 'loop'), 2, GRID, vmap=False)
  return root, vmapped, looped


def test_sweep_json_is_well_formed(sweeps):
  root, result, _ = sweeps
  assert json.load(open(root / 'vmap' / 'sweep.json')) == json.loads(json.dumps(result))
  assert [(r['settings'], r['seed']) for r in result['runs']] == [
      ({'generator.learning_rate': 2e-3}, s) for s in (0, 1)]
  assert all(0 <= r['test_accuracy'] <= 1 and r['group'] == 0 for r in result['runs'])
  assert [s['n'] for s in result['summary']] == [2] and result['overall']['n'] == 2
  for row in result['summary'] + [result['overall']]:
    assert row['min'] <= row['mean'] <= row['max'] and row['std'] >= 0
  table = open(root / 'vmap' / 'sweep.md').read()
  assert '| rdskd | generator.learning_rate=0.002 | 2 |' in table and '| rdskd | overall | 2 |' in table


def test_each_run_records_its_cost(sweeps):
  """Seconds and generated samples per run: a vmapped group's seconds are shared out, a
  run alone has its own (from its report.json), and the table shows both per setting."""
  root, vmapped, looped = sweeps
  config = vmapped['config']
  samples = {'generator_samples': config['generator']['steps'] * config['generator']['batch_size'],
             'student_samples': config['student']['steps'] * config['student']['batch_size']}
  group = sum(vmapped['seconds']['group0'].values())
  for r in vmapped['runs']:
    assert r['seconds_are'] == 'group share' and r['training_seconds'] == pytest.approx(group / 2)
    assert {k: r[k] for k in samples} == samples
  for i, r in enumerate(looped['runs']):
    report = json.load(open(root / 'loop' / 'runs' / str(i) / 'report.json'))
    assert r['seconds_are'] == 'its own' and r['training_seconds'] == pytest.approx(
        report['generator']['seconds'] + report['student']['seconds'])
  row = looped['summary'][0]
  assert row['training_seconds'] == pytest.approx(np.mean([r['training_seconds'] for r in looped['runs']]))
  assert row['student_samples'] == samples['student_samples'] == 6 * 16
  table = open(root / 'loop' / 'sweep.md').read()
  assert f"| {row['training_seconds']:.0f} | 96 |" in table
  dafl = config_lib.base_config('smoke')
  dafl.method, dafl.dafl.steps, dafl.dafl.batch_size = 'dafl', 7, 8
  assert sweep.run_cost(dafl, 3.0, 'its own') == {
      'training_seconds': 3.0, 'seconds_are': 'its own', 'generator_samples': 56,
      'student_samples': 56}


def test_plot_draws_sweeps_side_by_side(sweeps, tmp_path, capsys):
  """`python -m rdskd_jax.plot --sweeps=...` draws robustness.png; a directory without
  sweep.json, or both or neither of --workdir and --sweeps, is a one-line error."""
  from rdskd_jax import plot
  root, _, _ = sweeps
  out = tmp_path / 'robustness.png'
  assert plot.main([f'--sweeps={root / "vmap"},{root / "loop"}', f'--out={out}']) == 0
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(out) > 10_000
  assert plot.main([f'--sweeps={tmp_path}', f'--out={out}']) == 2
  assert 'has no sweep.json' in capsys.readouterr().err
  for argv in ([], [f'--workdir={tmp_path}', f'--sweeps={root / "vmap"}']):
    with pytest.raises(SystemExit):
      plot.main(argv)
  assert 'one of the two' in capsys.readouterr().err


def test_finished_runs_copied_elsewhere_are_not_run_again(sweeps, tmp_path):
  """A one-by-one sweep takes a run's copied config.json and report.json as finished,
  with its teacher at another path; a report of another teacher is not taken (its
  workdir then refuses the run), and a missing run is run."""
  import shutil
  from configs import mnist
  root, _, looped = sweeps
  teacher = tmp_path / 'elsewhere' / 'teacher_variables'
  shutil.copytree(root / 'vmap' / 'teacher' / 'teacher_variables', teacher)
  for i in (0, 1):
    (tmp_path / 'copy' / 'runs' / str(i)).mkdir(parents=True)
    for name in ('config.json', 'report.json'):
      shutil.copy(root / 'loop' / 'runs' / str(i) / name, tmp_path / 'copy' / 'runs' / str(i))
  report_1 = tmp_path / 'copy' / 'runs' / '1' / 'report.json'
  content = json.load(open(report_1))
  content['teacher']['fingerprint'] = 'another teacher'
  json.dump(content, open(report_1, 'w'))
  config = mnist.get_config('tiny')
  config.data_dir, config.dtype = looped['config']['data_dir'], 'float64'
  config.teacher.checkpoint = str(teacher)
  with jax.enable_x64(True):
    # Not finished for this teacher, so run: its workdir refuses, naming the teacher field.
    with pytest.raises(config_lib.ConfigError, match=r'holds a run of another config '
                       r'\(teacher.checkpoint: '):
      sweep.sweep(config, str(tmp_path / 'copy'), 2, GRID, vmap=False)
  assert not (tmp_path / 'copy' / 'runs' / '0' / 'checkpoints').exists()
  shutil.rmtree(tmp_path / 'copy' / 'runs' / '1')
  with jax.enable_x64(True):
    again = sweep.sweep(config, str(tmp_path / 'copy'), 2, GRID, vmap=False)
  assert not (tmp_path / 'copy' / 'runs' / '0' / 'checkpoints').exists()
  assert (tmp_path / 'copy' / 'runs' / '1' / 'checkpoints').exists()
  for a, b in zip(again['runs'], looped['runs']):
    assert a['test_accuracy'] == pytest.approx(b['test_accuracy'], abs=3e-4)
  assert again['runs'][0] == looped['runs'][0]


def test_the_study_table_reads_finished_runs(sweeps, tmp_path):
  """experiments/robustness_table.py: a row per finished run, a summary per setting; an
  unfinished run (no 'timing' in its report) is left out."""
  import shutil
  from experiments import robustness_table
  root, _, looped = sweeps
  for i in (0, 1):
    shutil.copytree(root / 'loop' / 'runs' / str(i), tmp_path / 'rdskd' / 'runs' / str(i),
                    ignore=shutil.ignore_patterns('checkpoints', 'tensorboard'))
  report = json.load(open(tmp_path / 'rdskd' / 'runs' / '1' / 'report.json'))
  del report['timing']
  json.dump(report, open(tmp_path / 'rdskd' / 'runs' / '1' / 'report.json', 'w'))
  text = robustness_table.tables(str(tmp_path))
  accuracy = looped['runs'][0]['test_accuracy']
  assert '### rdskd: 1 finished runs' in text
  assert f'| 0 | generator.learning_rate=0.002 | 0 | {accuracy:.4f} |' in text
  assert f'| generator.learning_rate=0.002 | 1 | {accuracy:.4f} | {accuracy:.4f} |' in text
  assert not [line for line in text.splitlines() if line.startswith('| 1 |')]


def _final(directory):
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  return ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), 'default'))


def test_vmapped_runs_equal_separate_runs(sweeps):
  """Seeds and learning rates batched in one program give each run's own result."""
  root, vmapped, looped = sweeps
  for stage in ('generator', 'student'):
    stacked = _final(root / 'vmap' / 'groups' / '0' / 'checkpoints' / stage)
    for i in range(2):
      alone = _final(root / 'loop' / 'runs' / str(i) / 'checkpoints' / stage)
      for path in (('params',), ('batch_stats',)):
        if path[0] not in alone:
          continue
        got = stacked[path[0]]
        leaves_got = [np.asarray(x)[i] for x in _leaves(got)]
        leaves_want = [np.asarray(x) for x in _leaves(alone[path[0]])]
        for g, w in zip(leaves_got, leaves_want):
          np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f'{stage} run {i}')
  for a, b in zip(vmapped['runs'], looped['runs']):
    assert a['settings'] == b['settings'] and a['seed'] == b['seed']
    assert abs(a['test_accuracy'] - b['test_accuracy']) <= 3e-4  # Near-tie argmaxes.


def _leaves(tree):
  return jax.tree.leaves(tree)


def test_a_group_workdir_refuses_other_runs(tmp_path):
  from configs import mnist
  base = mnist.get_config('smoke')
  runs = [run for _, _, run in sweep.run_configs(base, 2, sweep.parse_grid(
      'generator.learning_rate=1e-3'))]
  sweep.prepare_group_workdir(runs, str(tmp_path))
  sweep.prepare_group_workdir(runs, str(tmp_path))  # The same runs: resumed.
  other = [run for _, _, run in sweep.run_configs(base, 2, sweep.parse_grid(
      'generator.learning_rate=0.5'))]
  with pytest.raises(config_lib.ConfigError, match=r"holds other runs \(run 0: "
                     r"generator.learning_rate: 0.001 there, 0.5 now\); use another"):
    sweep.prepare_group_workdir(other, str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='holds 2 runs, this sweep puts 3 there'):
    sweep.prepare_group_workdir(
        [run for _, _, run in sweep.run_configs(base, 3, [{}])], str(tmp_path))
