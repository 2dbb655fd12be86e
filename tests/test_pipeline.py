"""End to end on real MNIST: teacher, generator, student, report; resume; the paper preset."""

import json
import os

import numpy as np
import pytest

from configs import mnist
from rdskd_jax import config_lib, data, metrics, train


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, mnist_data_dir):
  config = mnist.get_config('smoke')
  config.data_dir = mnist_data_dir
  workdir = str(tmp_path_factory.mktemp('smoke'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_report_records_every_stage(smoke_run):
  _, workdir, report = smoke_run
  on_disk = json.load(open(os.path.join(workdir, 'report.json')))
  assert on_disk == json.loads(json.dumps(report))
  assert report['dataset'] == 'mnist' and report['devices'] >= 1
  assert report['parallel'] == 'pmap' and report['preset'] == 'smoke'
  assert report['machine']['cpu_count'] >= 1 and report['machine']['device_kind'] == 'cpu'
  # 8 steps on 4k real images already beat chance on the real test split by far.
  assert 0.3 < report['teacher']['test_accuracy'] <= 1.0
  assert report['teacher']['seconds'] > 0
  assert report['generator']['steps'] == 6 and report['generator']['seconds'] > 0
  assert report['student']['steps'] == 6 and 0.0 <= report['student']['test_accuracy'] <= 1.0
  assert 0.0 <= report['student']['generated_agreement'] <= 1.0


def test_metrics_and_samples_are_written(smoke_run):
  config, workdir, _ = smoke_run
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  generator = [r for r in rows if r['stage'] == 'generator']
  student = [r for r in rows if r['stage'] == 'student']
  assert [r['step'] for r in generator] == [2, 3, 4, 6]  # 3: an image_every row
  assert [r['step'] for r in generator if 'coverage_entropy' in r] == [3, 6]
  assert [r['step'] for r in student] == [2, 3, 4, 6]  # 3: an eval_every row
  for r in generator:
    assert {'one_hot', 'information_entropy', 'diversity', 'total'} <= set(r)
    assert all(np.isfinite(v) for k, v in r.items() if k not in ('stage', 'step'))
    assert -np.log(10) - 1e-5 <= r['information_entropy'] <= 0
  assert all(np.isfinite(r['kd']) and r['kd'] >= 0 for r in student)
  assert [r['step'] for r in student if 'test_accuracy' in r] == [3, 6]  # eval_every=3
  assert os.path.getsize(os.path.join(workdir, 'samples.png')) > 1000
  assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 1000
  diagnostics = [r for r in rows if r['stage'] == 'diagnostics']
  assert len(diagnostics) == 1 and diagnostics[0]['step'] == config.generator.steps


def test_diagnostics_in_report_and_tensorboard(smoke_run):
  """The diagnostics are in report.json and metrics.jsonl; TensorBoard gets the same
  scalars and the generator's sample grids."""
  import tensorflow as tf
  _, workdir, report = smoke_run
  d = report['diagnostics']
  assert d['samples'] == 256
  assert 0.0 <= d['coverage_entropy'] <= np.log(10) + 1e-9
  assert 0.0 <= d['min_class_share'] <= 0.1
  assert 0.1 <= d['teacher_confidence'] <= 1.0
  assert d['intra_class_diversity'] > 0 and d['frechet_distance_to_test'] > 0
  tags = set()
  for path in tf.io.gfile.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {'generator/total', 'student/kd', 'diagnostics/frechet_distance_to_test',
          'generator/samples', 'generator/coverage_entropy'} <= tags


def test_each_tensorboard_write_is_on_disk_at_once(tmp_path):
  """A running job's steps reach TensorBoard as they are logged, before any flush."""
  import tensorflow as tf
  writer = metrics.EventWriter(str(tmp_path))
  writer.write_scalars(3, {'student/kd': 0.5})
  [path] = tf.io.gfile.glob(str(tmp_path / 'events.out.tfevents.*'))
  events = list(tf.compat.v1.train.summary_iterator(path))
  assert events[0].file_version == 'brain.Event:2'
  assert [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value] == [
      (3, 'student/kd', 0.5)]


def _files_left_open_under(directory):
  """The files under `directory` that this process still holds open (Linux's /proc)."""
  paths = []
  for fd in os.listdir('/proc/self/fd'):
    try:
      paths.append(os.readlink(f'/proc/self/fd/{fd}'))
    except OSError:  # The listing's own descriptor, closed by now.
      pass
  return [p for p in paths if p.startswith(os.path.abspath(directory) + os.sep)]


def test_a_finished_run_leaves_no_file_open(smoke_run):
  """The event file included: the runs of one Python (a notebook's) would pile them up."""
  _, workdir, _ = smoke_run
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert _files_left_open_under(workdir) == []


def test_plot_command_writes_curves_and_refreshes_samples(smoke_run):
  import subprocess
  import sys
  _, workdir, _ = smoke_run
  for name in ('curves.png', 'samples.png'):
    os.remove(os.path.join(workdir, name))
  result = subprocess.run([sys.executable, '-m', 'rdskd_jax.plot', f'--workdir={workdir}'],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  for name in ('curves.png', 'samples.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  bad = subprocess.run([sys.executable, '-m', 'rdskd_jax.plot', '--workdir=/nonexistent'],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "error: '/nonexistent' has no metrics.jsonl" in bad.stderr


def test_rerun_resumes_and_changes_nothing(smoke_run):
  config, workdir, report = smoke_run
  metrics_before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  again = train.train_and_evaluate(config, workdir)
  assert again['student']['test_accuracy'] == report['student']['test_accuracy']
  assert again['teacher']['test_accuracy'] == report['teacher']['test_accuracy']
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == metrics_before


def test_paper_preset_runs_its_first_steps(tmp_path, mnist_data_dir, monkeypatch):
  """The default preset unchanged but for step counts (and a slice of train data), with
  light reporting (the smoke run above checks it), reported on a validation slice: the
  train images after the teacher's."""
  config = mnist.get_config()
  config.data_dir = mnist_data_dir
  config.teacher.max_train_examples = 2 * config.teacher.batch_size
  config.teacher.epochs = 1
  config.generator.steps = 2
  config.student.steps = 2
  config.log_every = 1
  config.test_split = f'train[{config.teacher.max_train_examples}:]'
  config.test_examples, config.figures = 1000, False
  config.diagnostic_samples = config.student.agreement_samples = 512
  read = []  # The real data the run reads: (split, first examples).
  load_split = data.load_split
  monkeypatch.setattr(data, 'load_split', lambda config, split, count=0, **kwargs: (
      read.append(data.first_examples(split, count)) or
      load_split(config, split, count, **kwargs)))
  report = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows if r['stage'] == 'generator'] == [1, 2]
  assert report['config']['generator']['batch_size'] == 512
  assert report['config']['student']['steps'] == 2
  n = config.teacher.max_train_examples
  assert sorted(read) == sorted([f'train[:{n}]', f'train[{n}:{n + 1000}]'])  # No test split.
  assert 0 <= report['student']['test_accuracy'] <= 1


def test_teacher_checkpoint_is_reused_without_training(smoke_run, tmp_path):
  config, workdir, report = smoke_run
  config = config.copy_and_resolve_references()
  config.teacher.checkpoint = os.path.join(workdir, 'teacher_variables')
  config.generator.steps = 1
  config.student.steps = 1
  config.generator.width, config.figures = 1 / 16, False
  reused = train.train_and_evaluate(config, str(tmp_path))
  assert reused['teacher']['test_accuracy'] == report['teacher']['test_accuracy']
  assert reused['teacher']['checkpoint'] == config.teacher.checkpoint
  assert not os.path.exists(tmp_path / 'checkpoints' / 'teacher')


def test_missing_teacher_checkpoint_is_a_config_error(smoke_config, tmp_path):
  smoke_config.teacher.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(config_lib.ConfigError, match='no such checkpoint directory'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'w'))
