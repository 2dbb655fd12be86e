"""Figures and a table of the generator-schedule runs (experiments/generator_schedule.sh).

    python -m experiments.generator_schedule_figures --out=docs/figures NAME=WORKDIR ...

Writes OUT/generator_schedule_accuracy.png (each run's student test accuracy, logged every
`student.eval_every` steps for reporting only, and the generator losses per step) and
OUT/generator_schedule_samples.png (the runs' samples.png side by side), and prints a
Markdown table of each run's report.json.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def table(runs) -> str:
  lines = ['| run | generator steps x batch | student steps x batch | seconds (generator / '
           'student) | teacher test acc | student test acc | agreement on generated | '
           'coverage entropy | min class share | teacher confidence | Frechet to test |',
           '|' + '---|' * 11]
  for name, workdir in runs:
    r = json.load(open(os.path.join(workdir, 'report.json')))
    c, d = r['config'], r['diagnostics']
    lines.append(
        f"| {name} | {c['generator']['steps']} x {c['generator']['batch_size']} | "
        f"{c['student']['steps']} x {c['student']['batch_size']} | "
        f"{r['generator']['seconds']:.0f} / {r['student']['seconds']:.0f} | "
        f"{r['teacher']['test_accuracy']:.4f} | {r['student']['test_accuracy']:.4f} | "
        f"{r['student']['generated_agreement']:.4f} | {d['coverage_entropy']:.3f} | "
        f"{d['min_class_share']:.3f} | {d['teacher_confidence']:.3f} | "
        f"{d['frechet_distance_to_test']:.1f} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m experiments.generator_schedule_figures')
  parser.add_argument('--out', required=True)
  parser.add_argument('runs', nargs='+', help='NAME=WORKDIR')
  args = parser.parse_args(argv)
  runs = [tuple(r.split('=', 1)) for r in args.runs]
  os.makedirs(args.out, exist_ok=True)

  fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
  for name, workdir in runs:
    rows = _rows(workdir)
    points = [(r['step'], r['test_accuracy']) for r in rows
              if r['stage'] == 'student' and 'test_accuracy' in r]
    final = json.load(open(os.path.join(workdir, 'report.json')))['student']
    if points[-1][0] != final['steps']:
      points.append((final['steps'], final['test_accuracy']))
    axes[0].plot(*zip(*points), marker='o', label=name)
    generator = [r for r in rows if r['stage'] == 'generator']
    axes[1].plot([r['step'] for r in generator], [r['one_hot'] for r in generator], label=name)
    axes[2].plot([r['step'] for r in generator], [r['diversity'] for r in generator],
                 label=name)
  axes[0].set(title='student test accuracy (reporting only)', xlabel='student step')
  axes[1].set(title='generator L_oh', xlabel='generator step', yscale='log')
  axes[2].set(title='generator L_ds', xlabel='generator step', yscale='log')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'generator_schedule_accuracy.png'), dpi=90)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 6.6))
  for ax, (name, workdir) in zip(axes, runs):
    ax.imshow(mpimg.imread(os.path.join(workdir, 'samples.png')))
    ax.set_title(name)
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'generator_schedule_samples.png'), dpi=90)
  plt.close(fig)
  print(table(runs))


if __name__ == '__main__':
  main()
