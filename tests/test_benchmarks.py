"""The step benchmark's output contract: JSON lines only on stdout, one per step."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_steps_benchmark_prints_one_json_object_per_step():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.steps', '--config=configs/mnist.py:smoke',
       '--batch=8', '--repeats=2', '--warmup=0', '--config.dtype=bfloat16'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r['step'] for r in rows] == ['generator', 'student']
  for r in rows:
    assert r['batch'] == 8 and r['devices'] == 2 and r['platform'] == 'cpu'
    assert r['dtype'] == 'bfloat16' and r['framework'] == 'jax'
    assert 0 < r['min_seconds'] <= r['median_seconds']
