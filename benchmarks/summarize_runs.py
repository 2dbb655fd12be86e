"""Summarises finished run workdirs as the README's results table (one row per run).

    python -m benchmarks.summarize_runs W1 [W2 ...]

Reads each `report.json` and prints a Markdown row: preset and the settings that differ
between budgets, the wall time of each stage, the total, and the accuracies.
"""

import json
import os
import sys


def row(workdir: str) -> str:
  r = json.load(open(os.path.join(workdir, 'report.json')))
  c = r['config']
  total = r['teacher']['seconds'] + r['generator']['seconds'] + r['student']['seconds']
  agreement = r['student'].get('generated_agreement')
  return ' | '.join([
      f"`{r.get('preset', '')}`",
      f"{c['teacher']['epochs']} ep",
      f"{c['generator']['steps']} x {c['generator']['batch_size']}",
      f"{c['student']['steps']} x {c['student']['batch_size']}",
      f"{c['student']['learning_rate']:g} {c['student']['schedule']}",
      f"{r['teacher']['seconds']:.0f} / {r['generator']['seconds']:.0f} / {r['student']['seconds']:.0f}",
      f"{total / 60:.1f}",
      f"{r['teacher']['test_accuracy']:.4f}",
      f"{r['student']['test_accuracy']:.4f}",
      f"{agreement:.4f}" if agreement is not None else 'n/a',
  ])


def main(argv):
  print('| preset | teacher | generator steps x batch | student steps x batch | student lr | '
        'seconds (teacher / generator / student) | training minutes | teacher test acc | '
        'student test acc | agreement on generated |')
  print('|' + '---|' * 10)
  for workdir in argv[1:]:
    print('| ' + row(workdir) + ' |')


if __name__ == '__main__':
  main(sys.argv)
