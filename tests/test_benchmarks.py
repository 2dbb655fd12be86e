"""The step benchmark's output contract: JSON lines only on stdout, one per step."""

import json
import os
import subprocess
import sys
import tarfile

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_steps_benchmark_prints_one_json_object_per_step():
  # LLVM's optimisation level 0: the script's output is checked, not its programs' speed,
  # and the bfloat16 programs' code generation at level 1 is half of this test's time.
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(2, llvm_level=0))
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.steps', '--config=configs/mnist.py:tiny',
       '--batch=8', '--repeats=2', '--warmup=0', '--config.dtype=bfloat16',
       '--steps_per_call=1,3', '--flops'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert [(r['step'], r['steps_per_call']) for r in rows] == [
      ('generator', 1), ('generator', 3), ('student', 1), ('student', 3)]
  for r in rows:
    assert r['batch'] == 8 and r['devices'] == 2 and r['platform'] == 'cpu'
    assert r['dtype'] == 'bfloat16' and r['framework'] == 'jax'
    assert 0 < r['min_seconds'] <= r['median_seconds']
    assert r['flops_per_step'] > 0 and r['matmul_peak_flops_per_second'] > 0
  # One step's count, whatever the steps per call.
  assert rows[0]['flops_per_step'] == rows[1]['flops_per_step']


# Imported first by every Python the script starts: an accelerator image's environment,
# with no TensorFlow or tfds.
_NO_TENSORFLOW = """import sys
for name in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[name] = None
"""


def test_the_gpu_paper_script_runs_its_parts_in_smoke_mode(mnist_arrays_dir, tmp_path):
  """As on the accelerator image: without TensorFlow or tfds, MNIST read from its
  exported arrays, TensorBoard files written all the same."""
  import tensorflow as tf
  out, work, site = tmp_path / 'out', tmp_path / 'work', tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(_NO_TENSORFLOW)
  env = dict(os.environ, SMOKE='1', WORK=str(work), PYTHON=sys.executable,
             TFDS_DATA_DIR=mnist_arrays_dir, PYTHONPATH=str(site))
  result = subprocess.run(['bash', 'benchmarks/gpu_paper.sh', str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  parts = [json.loads(line) for line in open(out / 'parts.jsonl')]
  assert [(p['part'], p['exit']) for p in parts] == [
      ('rdskd_f32', 0), ('rdskd_bank', 0), ('cpu_generator', 0), ('dafl', 0)], (
          open(work / 'rdskd_bank.log').read()[-2000:])
  with tarfile.open(out / 'results.tar.gz') as tar:
    names = set(tar.getnames())
  for part in ('rdskd_f32', 'rdskd_bank', 'cpu_generator', 'dafl'):
    assert {f'./{part}/report.json', f'./{part}/metrics.jsonl', f'./{part}.log'} <= names
  report = json.load(open(work / 'rdskd_bank' / 'report.json'))
  assert report['teacher']['checkpoint'] and report['generator']['checkpoint']
  assert report['student']['reuse'] == 4
  report = json.load(open(work / 'cpu_generator' / 'report.json'))
  assert report['teacher']['checkpoint'] == str(work / 'rdskd_f32' / 'teacher_variables')
  assert 'checkpoint' not in report['generator'] and report['generator']['steps'] == 3
  assert 0 <= json.load(open(work / 'rdskd_f32' / 'report.json'))['student']['test_accuracy'] <= 1
  scalars, images = set(), {}
  for path in tf.io.gfile.glob(str(work / 'rdskd_f32' / 'tensorboard' / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('image'):
          images[value.tag] = tf.io.decode_png(value.image.encoded_image_string).shape
        elif value.HasField('simple_value'):
          scalars.add(value.tag)
  assert {'teacher/loss', 'generator/total', 'student/kd'} <= scalars
  assert images['generator/samples'][-1] == 1 and images['generator/samples'][0] > 32
