"""The `cpu` preset's seconds outside the stages' loops, for one or more checkouts.

    python -m benchmarks.outside_steps [--repeats=2] CHECKOUT...

Runs the README's command (`configs/mnist.py:cpu`) in each checkout with the stages'
step counts cut, and every reporting event of the preset kept: the teacher's test
evaluation, 3 generator sample grids with coverage statistics (every 40 of 120 steps,
here every 4 of 12), 7 student test evaluations (every 500 of 3,500 steps, here every 5
of 35), the diagnostics of 4,096 samples, the agreement of 4,096, samples.png and
curves.png. The time outside the loops is the command's wall time (Python start and
imports included) less the stage seconds in its report.json (the loops' steps, their
compilation and checkpoints). It does not depend on the step counts.

Prints one JSON line per run: checkout, commit, wall, stage-loop and outside seconds.
Time it alone: two jobs on two cores each take about twice as long.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

OVERRIDES = ['--config.teacher.max_train_examples=1280', '--config.generator.steps=12',
             '--config.generator.epoch_length=4', '--config.image_every=4',
             '--config.student.steps=35', '--config.student.eval_every=5',
             '--config.log_every=5', '--config.checkpoint_every=20']


def measure(checkout: str) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'rdskd_jax.main', '--config=configs/mnist.py:cpu',
                    f'--workdir={workdir}', *OVERRIDES], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    report = json.load(open(os.path.join(workdir, 'report.json')))
  stages = sum(report[s]['seconds'] for s in ('teacher', 'generator', 'student'))
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=checkout,
                          capture_output=True, text=True).stdout.strip()
  return {'checkout': checkout, 'commit': commit, 'wall_seconds': round(wall, 1),
          'stage_loop_seconds': round(stages, 1), 'outside_seconds': round(wall - stages, 1)}


def main(argv):
  repeats = 1
  checkouts = []
  for arg in argv[1:]:
    if arg.startswith('--repeats='):
      repeats = int(arg.split('=', 1)[1])
    else:
      checkouts.append(arg)
  if not checkouts:
    sys.exit('usage: python -m benchmarks.outside_steps [--repeats=N] CHECKOUT...')
  for _ in range(repeats):
    for checkout in checkouts:
      print(json.dumps(measure(checkout)), flush=True)


if __name__ == '__main__':
  main(sys.argv)
