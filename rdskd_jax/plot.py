"""Pictures of a run: generated samples by teacher class, and loss and accuracy curves;
and of sweeps: every run's student accuracy per setting.

    python -m rdskd_jax.plot --workdir=W    # writes W/curves.png, refreshes W/samples.png
    python -m rdskd_jax.plot --sweeps=W1,W2 --out=robustness.png
"""

import argparse
import os
import sys

import jax
import numpy as np

from rdskd_jax import diagnostics, evaluation, methods, metrics, runs, stages
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.errors import ConfigError, DataError, RunStopped


def _figure(**kwargs):
  """A matplotlib Figure drawn to files only: no pyplot, so no global backend is chosen
  (a notebook's stays as it is) and no figure is kept open. Imported here, where a figure
  is drawn: a run without figures (`figures=False`) does not pay for the import."""
  from matplotlib.figure import Figure
  return Figure(**kwargs)


def save_samples(path, generator, generator_vars, teacher, teacher_vars, latent_dim, config,
                 key, num_samples: int = 512, per_class: int = 8) -> None:
  """A grid with one row per class: generated images the teacher assigns to that class.

  Images come from the trained generator as the student stage draws them (its BatchNorm
  mode and, in 'batch' mode, its batch size: evaluation.sampling); rows with fewer than
  `per_class` samples (a class the generator rarely produces) stay partly empty, which is
  itself a diagnostic.
  """
  images = diagnostics.generated_images(generator, generator_vars, latent_dim, key,
                                        num_samples, **evaluation.sampling(config))
  save_class_grid(path, images, teacher, teacher_vars, config, per_class,
                  'generated samples by teacher class (share of samples)')


def save_class_grid(path, images, teacher, teacher_vars, config, per_class: int = 8,
                    title: str = 'synthesised images by teacher class (share of images)'):
  """One row per class of `images` the teacher assigns to it, most confident first."""
  logits, _ = teacher.apply(teacher_vars, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits))
  predicted = probs.argmax(-1)
  std, mean = np.asarray(config.std), np.asarray(config.mean)
  pictures = np.clip(np.asarray(images) * std + mean, 0.0, 1.0)
  num_classes = probs.shape[-1]
  fig = _figure(figsize=(per_class * 0.9, num_classes * 0.9))
  axes = fig.subplots(num_classes, per_class)
  for c in range(num_classes):
    members = np.flatnonzero(predicted == c)
    members = members[np.argsort(-probs[members, c])][:per_class]
    for j in range(per_class):
      ax = axes[c, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if j < len(members):
        picture = pictures[members[j]]
        ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap='gray',
                  vmin=0, vmax=1)
      if j == 0:
        ax.set_ylabel(f'{c} ({np.mean(predicted == c):.0%})', fontsize=7)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def sample_grid(images, config, columns: int = 8) -> np.ndarray:
  """Images (NHWC, normalised) as one de-normalised [0, 1] grid image (H, W, C), rows of
  `columns` images with a 1-pixel gap; for TensorBoard."""
  images = np.clip(np.asarray(images, np.float32) * np.asarray(config.std, np.float32)
                   + np.asarray(config.mean, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = image
  return grid


# Generator losses of metrics.jsonl, in plotting order.
_GENERATOR_CURVES = ('one_hot', 'information_entropy', 'diversity', 'activation', 'bn_prior',
                     'total', 'generator_l1', 'class', 'tv', 'competition', 'impression')


def save_curves(workdir: str, path: str = '') -> str:
  """`curves.png` from `metrics.jsonl`: the generator's losses, the student's KD loss, and
  the student's test accuracy (reporting rows and the final value in report.json) per
  logged step. Returns the path written."""
  rows = metrics.read_rows(os.path.join(workdir, 'metrics.jsonl'))
  report_path = os.path.join(workdir, 'report.json')
  report = (workdir_lib.read_json(report_path, "run the job's command again to rebuild it")
            if os.path.exists(report_path) else {})
  by_stage = lambda stage: [r for r in rows if r['stage'] == stage]
  fig = _figure(figsize=(13, 3.4))
  axes = fig.subplots(1, 3)
  # A method with one stage for both networks names it after itself (report.json's
  # `config.method`); a method without a generator logs its inputs' optimisation
  # (train_steps.optimise_inputs: `best_total`).
  method = report.get('config', {}).get('method', '')
  joint = by_stage(method) if method else []
  synthesis = joint if any('best_total' in r for r in joint) else []
  generator = by_stage('generator') or joint
  curves = getattr(methods.get(method), 'CURVES', {}) if method in methods.METHODS else {}
  for name in curves.get('generator', _GENERATOR_CURVES):
    points = [(r['step'], r[name]) for r in generator if name in r]
    if points:
      axes[0].plot(*zip(*points), label=name)
  axes[0].set_title('synthesis losses' if synthesis else 'generator losses')
  axes[0].set_yscale('symlog', linthresh=1e-2)
  student = by_stage('student') or joint
  loss, title = curves.get('student', ('kd', 'student KD loss'))
  if student:
    axes[1].plot([r['step'] for r in student], [r[loss] for r in student])
    axes[1].set_yscale('log')
  axes[1].set_title(title)
  accuracy = [(r['step'], r['test_accuracy']) for r in student if 'test_accuracy' in r]
  final = report.get('student', {})
  # Synthesis methods log their stage's steps; their reports count KD steps.
  last = student[-1]['step'] if synthesis else final.get('steps')
  if 'test_accuracy' in final and (not accuracy or accuracy[-1][0] != last):
    accuracy.append((last, final['test_accuracy']))
  if accuracy:
    axes[2].plot(*zip(*accuracy), marker='o')
  teacher = report.get('teacher', {}).get('test_accuracy')
  if teacher is not None:
    axes[2].axhline(teacher, color='gray', linestyle='--', label=f'teacher {teacher:.4f}')
    axes[2].legend(fontsize=8)
  axes[2].set_title('student test accuracy (reporting only)')
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  if generator:
    axes[0].legend(fontsize=8)
  fig.tight_layout()
  path = path or os.path.join(workdir, 'curves.png')
  fig.savefig(path, dpi=90)
  return path


def read_sweep(directory: str):
  """The sweep.json of a sweep's workdir; a directory without one is a DataError."""
  path = os.path.join(directory, 'sweep.json')
  if not os.path.exists(path):
    raise DataError(f'{directory!r} has no sweep.json: not the workdir of a finished sweep '
                    '(python -m rdskd_jax.sweep writes it at the end)')
  return workdir_lib.read_json(path, 'run the sweep again to rebuild it')


_SHORT_NAMES = {'learning_rate': 'lr', 'generator_learning_rate': 'gen lr',
                'student_learning_rate': 'student lr'}


def _setting_label(settings) -> str:
  """{'generator.learning_rate': 0.001, 'dafl.beta': 5.0} -> 'lr 0.001\nbeta 5'."""
  def short(field):
    last = field.split('.')[-1]
    return _SHORT_NAMES.get(last, last)
  return '\n'.join(f'{short(k)} {v:g}' if isinstance(v, (int, float)) else f'{short(k)} {v}'
                   for k, v in settings.items()) or 'base config'


def save_robustness(sweep_dirs, path: str) -> str:
  """`robustness.png`: per setting of each sweep, every seed's student test accuracy as a
  point, the mean as a bar and the worst seed marked by a red triangle; each setting's training
  seconds per run under its label. Sweeps are drawn side by side, in the order given.
  Test accuracy is reported here, never used to choose. Returns the path written."""
  results = [read_sweep(d) for d in sweep_dirs]
  settings = sum(len(r['summary']) for r in results)
  import matplotlib
  fig = _figure(figsize=(max(4.0, 0.9 * settings + 1.5), 4.2))
  ax = fig.subplots()
  colours = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  labels, positions, x = [], [], 0.0
  for m, result in enumerate(results):
    colour = colours[m % len(colours)]
    for i, row in enumerate(result['summary']):
      accs = [r['test_accuracy'] for r in result['runs'] if r['settings'] == row['settings']]
      jitter = np.linspace(-0.12, 0.12, len(accs)) if len(accs) > 1 else [0.0]
      ax.scatter(x + np.asarray(jitter), accs, color=colour, s=18, zorder=3,
                 label=f"{result['method']}: each seed" if i == 0 else None)
      ax.hlines(np.mean(accs), x - 0.3, x + 0.3, color=colour, linewidth=2.5,
                label=f"{result['method']}: mean" if i == 0 else None)
      ax.scatter([x + 0.38], [min(accs)], marker='<', color='tab:red', s=30, zorder=4,
                 label='worst seed' if m == 0 and i == 0 else None)
      cost = f"\n{row['training_seconds']:.0f} s/run" if 'training_seconds' in row else ''
      labels.append(f"{result['method']}\n{_setting_label(row['settings'])}{cost}")
      positions.append(x)
      x += 1
    x += 0.5  # A gap between methods.
  ax.set_xticks(positions, labels, fontsize=7)
  ax.set_ylabel('student test accuracy (reporting only)')
  seeds = sorted({r['seeds'] for r in results})
  ax.set_title(f"{results[0]['dataset']}, preset {results[0]['preset']!r}, "
               f"{'/'.join(map(str, seeds))} seeds per setting", fontsize=9)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=7, loc='best')  # 'best' keeps a low worst seed from hiding under it.
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m rdskd_jax.plot',
      description='Writes W/curves.png from metrics.jsonl and refreshes W/samples.png from '
                  "the run's generator and teacher checkpoints; or, with --sweeps, draws "
                  "the sweeps' student accuracies per setting.")
  parser.add_argument('--workdir', help="a run's workdir: curves.png and samples.png")
  parser.add_argument('--sweeps', help="sweeps' workdirs, comma-separated: robustness.png")
  parser.add_argument('--out', default='robustness.png', help='where --sweeps draws')
  args = parser.parse_args(argv)
  if bool(args.workdir) == bool(args.sweeps):
    parser.error('give --workdir=W (a run) or --sweeps=W1,W2 (sweeps), one of the two')
  if args.sweeps:
    try:
      print(save_robustness([d for d in args.sweeps.split(',') if d], args.out))
    except DataError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    return 0
  if not os.path.exists(os.path.join(args.workdir, 'metrics.jsonl')):
    print(f'error: {args.workdir!r} has no metrics.jsonl: not the workdir of a run',
          file=sys.stderr)
    return 2
  try:
    print(save_curves(args.workdir))
    run = runs.load_run(args.workdir)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except RunStopped as e:
    print(f'samples.png not refreshed: {e}', file=sys.stderr)
    return 1
  path = os.path.join(args.workdir, 'samples.png')
  if run.generator is None:  # A synthesised set: its latest images, as the run draws them.
    save_class_grid(path, run.images[-512:], run.teacher, run.teacher_vars, run.config)
  else:
    save_samples(path, run.generator, run.generator_vars, run.teacher, run.teacher_vars,
                 run.config.generator.latent_dim, run.config,
                 stages.samples_key(run.config))
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
