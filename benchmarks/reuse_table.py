"""The reuse study's table (benchmarks/reuse_study.sh) from its finished workdirs.

    python -m benchmarks.reuse_table W [--json=OUT]

One row per setting (reuse, student steps, bank size, generator steps) over the seeds that
finished: the student's test accuracy (reporting only) and agreement with the teacher on
fresh generated samples, mean (min, max), and the student stage's seconds as report.json
recorded them (the study's runs may share the machine; benchmarks/README.md has the step
times measured alone). `--json` also writes every run's numbers.
"""

import collections
import glob
import json
import os
import statistics
import sys


def runs(study: str):
  """Every finished run of the study: its setting, seed and numbers."""
  for path in sorted(glob.glob(os.path.join(study, '*', 'report.json'))):
    with open(path) as f:
      report = json.load(f)
    student = report.get('student', {})
    if 'test_accuracy' not in student:
      continue
    config = report['config']
    yield {'run': os.path.basename(os.path.dirname(path)), 'seed': config['seed'],
           'reuse': config['student'].get('reuse', 1),
           'student_steps': config['student']['steps'],
           'bank_size': student.get('bank_size', 0),
           'generator_steps': report['generator']['steps'],
           'teacher_fingerprint': report['teacher']['fingerprint'],
           'generator_fingerprint': report['generator'].get('fingerprint'),
           'test_accuracy': student['test_accuracy'],
           'generated_agreement': student['generated_agreement'],
           'student_seconds': student['seconds']}


def spread(values):
  return f'{statistics.mean(values):.4f} ({min(values):.4f}, {max(values):.4f})'


def main(argv):
  study = argv[1]
  rows = list(runs(study))
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r['generator_steps'], r['reuse'], r['student_steps'], r['bank_size'])].append(r)
  print('| generator steps | reuse | student steps | bank | seeds | student test accuracy | '
        'agreement on generated | student seconds (mean) |')
  print('|' + '---|' * 8)
  for (gen, reuse, steps, bank), group in sorted(groups.items(), key=lambda kv: (
      -kv[0][0], kv[0][2], kv[0][1], kv[0][3])):
    seeds = ','.join(str(r['seed']) for r in sorted(group, key=lambda r: r['seed']))
    print(f"| {gen} | {reuse} | {steps} | {bank or '-'} | {seeds} | "
          f"{spread([r['test_accuracy'] for r in group])} | "
          f"{spread([r['generated_agreement'] for r in group])} | "
          f"{statistics.mean(r['student_seconds'] for r in group):.0f} |")
  teachers = {r['teacher_fingerprint'] for r in rows}
  print(f'\n{len(rows)} runs, teacher fingerprints: {", ".join(sorted(teachers))}')
  for arg in argv[2:]:
    if arg.startswith('--json='):
      with open(arg[len('--json='):], 'w') as f:
        json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main(sys.argv)
