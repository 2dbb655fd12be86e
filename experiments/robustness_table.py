"""The robustness study's finished runs as Markdown, while the grid runs in parts.

    python experiments/robustness_table.py [docs/data/robustness]

Reads the runs kept by experiments/robustness_grid.sh (METHOD/runs/<i>/report.json) and
prints one row per finished run (its setting, seed, student test accuracy, agreement on
generated samples, training seconds and the CPU it ran on), then per setting the mean and
the worst seed of the runs finished so far. Once a method's grid is complete, its
sweep.json and `python -m rdskd_jax.plot --sweeps=...` give the same numbers and the
picture.
"""

import json
import os
import sys

# The fields each method's grid varies (docs/2026-12-01-robustness-grid.md).
GRID_FIELDS = {'rdskd': ('generator.learning_rate',),
               'dafl': ('dafl.generator_learning_rate', 'dafl.beta')}
JOINT = ('dafl', 'dfad')


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


def finished_runs(root, method):
  """[(run index, report)] of the finished runs of `method`, by index."""
  runs_dir = os.path.join(root, method, 'runs')
  if not os.path.isdir(runs_dir):
    return []
  runs = []
  for name in sorted(os.listdir(runs_dir), key=lambda n: int(n) if n.isdigit() else -1):
    path = os.path.join(runs_dir, name, 'report.json')
    if name.isdigit() and os.path.exists(path):
      with open(path) as f:
        report = json.load(f)
      if 'timing' in report:
        runs.append((int(name), report))
  return runs


def training_seconds(report):
  if report['config']['method'] in JOINT:
    return report[report['config']['method']]['seconds']
  return report['generator']['seconds'] + report['student']['seconds']


def tables(root):
  lines = []
  for method, fields in GRID_FIELDS.items():
    runs = finished_runs(root, method)
    if not runs:
      continue
    lines += [f'### {method}: {len(runs)} finished runs', '',
              '| run | setting | seed | student | agreement on generated | training s | CPU |',
              '|---|---|---|---|---|---|---|']
    by_setting = {}
    for index, report in runs:
      config = report['config']
      setting = ', '.join(f'{f}={_get(config, f):g}' for f in fields)
      accuracy = report['student']['test_accuracy']
      by_setting.setdefault(setting, []).append(accuracy)
      cpu = report.get('machine', {}).get('cpu', 'not recorded')
      lines.append(f"| {index} | {setting} | {config['seed']} | {accuracy:.4f} | "
                   f"{report['student']['generated_agreement']:.4f} | "
                   f'{training_seconds(report):.0f} | {cpu} |')
    lines += ['', '| setting | seeds finished | mean | worst |', '|---|---|---|---|']
    for setting, values in by_setting.items():
      lines.append(f'| {setting} | {len(values)} | {sum(values) / len(values):.4f} | '
                   f'{min(values):.4f} |')
    lines.append('')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(tables(sys.argv[1] if len(sys.argv) > 1 else 'docs/data/robustness'))
