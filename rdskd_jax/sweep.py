"""Seeds x settings of one method, with one trained teacher: the robustness study.

    python -m rdskd_jax.sweep --config=configs/mnist.py:cpu --workdir=W --seeds=3 \
        --grid='generator.learning_rate=1e-3,2e-3,4e-3'

`--grid` is `field=v1,v2,...` clauses joined by `;`; the settings are their cartesian
product (products joined by `|` follow one another), each run with seeds config.seed,
config.seed + 1, ... The teacher is trained once in `W/teacher` (or taken from
config.teacher.checkpoint) and shared by every run.

Runs whose configs differ only in the seed and learning rates share every shape, so they
are batched: their states are stacked along a leading run axis and each stage's step is
`jax.jit(jax.vmap(step))`, one compiled program for the whole group (the learning rate of
each run lives in its state). Runs that differ in anything else (batch sizes, step counts,
loss weights) form separate groups, run one after another. `--novmap` runs every run
through the ordinary pipeline one by one instead (`W/runs/<i>`; a run found finished
there, with its config and teacher, is read and not run again). Without either flag,
runs are vmapped on GPU/TPU and run one by one on CPU: on a 2-core CPU the vmapped convs
(one kernel per run, a grouped convolution) measured slower than the runs one by one.

Writes `W/sweep.json` (per run: settings, seed, student test accuracy, generated
agreement, training seconds and generated samples; per setting and overall: mean, std,
min, max; seconds) and `W/sweep.md`, the summary table; `python -m rdskd_jax.plot
--sweeps=W1,W2` draws sweeps side by side (robustness.png). Test accuracy is reported,
never used to pick anything. Each group checkpoints its stacked state, so an interrupted
sweep resumes where it stopped.
"""

import ast
import copy
import itertools
import json
import os
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rdskd_jax import (config_checks, data, evaluation, methods, metrics, parallel, runner,
                       stages, teacher as teacher_lib, train, workdir as workdir_lib)
from rdskd_jax.errors import ConfigError, run_reporting_errors
from rdskd_jax.methods import base


def vmapped_fields(config):
  """Fields that may differ within one vmapped group (no shape or program depends on
  them): the seed and the method's learning rates (its LEARNING_RATES)."""
  rates = getattr(methods.get(config.method), 'LEARNING_RATES', {})
  return ('seed', *(f for paths in rates.values() for f in paths.values()))


def parse_grid(text: str) -> List[Dict[str, Any]]:
  """'a.b=1,2;c=x' -> [{'a.b': 1, 'c': 'x'}, {'a.b': 2, 'c': 'x'}] (cartesian product);
  products joined by '|' are run one after another: 'a=1,2|b=x' -> [{'a': 1}, {'a': 2},
  {'b': 'x'}] (each field varied alone, the others at the config's values)."""
  if '|' in text:
    settings = []
    for part in text.split('|'):
      settings += [s for s in parse_grid(part) if s not in settings]
    return settings
  if not text.strip():
    return [{}]
  fields = {}
  for clause in text.split(';'):
    if not clause.strip():
      continue
    name, sep, values = clause.partition('=')
    if not sep or not name.strip() or not values.strip():
      raise ConfigError(f'--grid clause {clause!r}: expected field=value1,value2,...')
    fields[name.strip()] = [_literal(v.strip()) for v in values.split(',')]
  return [dict(zip(fields, combo)) for combo in itertools.product(*fields.values())]


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare string, such as a model name.


def _set(config, field: str, value) -> None:
  *path, last = field.split('.')
  node = config
  for part in path:
    node = node[part]
  if last not in node:
    raise ConfigError(f'--grid field {field!r}: no such config field')
  node[last] = type(node[last])(value) if isinstance(node[last], float) else value


def _get(config, field: str):
  for part in field.split('.'):
    config = config[part]
  return config


def run_configs(config, seeds: int, grid: List[Dict[str, Any]]):
  """[(settings, seed, config)] of every run: settings x seeds."""
  runs = []
  for settings in grid:
    for offset in range(seeds):
      run = copy.deepcopy(config)
      for field, value in settings.items():
        _set(run, field, value)
      run.seed = config.seed + offset
      runs.append((settings, run.seed, run))
  return runs


def group_key(config) -> str:
  """Runs with equal keys differ only in `vmapped_fields` and can share one program."""
  flat = json.loads(json.dumps(config.to_dict()))
  for field in vmapped_fields(config):
    *path, last = field.split('.')
    node = flat
    for part in path:
      node = node[part]
    node.pop(last)
  return json.dumps(flat, sort_keys=True)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _unit_learning_rates(config):
  """The config with every trained network's learning rate 1 (the runs' own rates then
  scale the updates; see train_steps.apply_gradients)."""
  unit = copy.deepcopy(config)
  for field in vmapped_fields(config)[1:]:
    _set(unit, field, 1.0)
  return unit


def _with_lr(state, config, stage):
  """`state` with each trained network's `lr_scale` from `config`: the method's
  LEARNING_RATES name, per stage, the field of each network's state ('': the root)."""
  for path, field in methods.get(config.method).LEARNING_RATES[stage].items():
    scale = jnp.float32(_get(config, field))
    state = dict(state, lr_scale=scale) if not path else dict(
        state, **{path: dict(state[path], lr_scale=scale)})
  return state


def _group_stage(configs, workdir, teacher_vars, log):
  """The stage runner of a vmapped group (base.Group.stage): the runs' states, each with
  its learning rates, stacked; the teacher shared, other frozen inputs one per run;
  resuming from the group's checkpoints. Returns (stacked host state, seconds)."""
  def stage(name, states, step_fn, total, frozen=None, derived=None):
    states = [_with_lr(s, c, name) for s, c in zip(states, configs)]
    frozen = dict(frozen or {})
    axes = dict({k: 0 for k in frozen}, teacher=None)
    keys = jnp.stack([stages.stage_key(c, name) for c in configs])
    return runner.run_stage(name, configs[0], workdir, parallel.RunBatch(len(configs), axes),
                            _stack(states), dict(frozen, teacher=teacher_vars), step_fn,
                            total, log, keys, derived=derived)
  return stage


def prepare_group_workdir(configs, workdir: str) -> None:
  """Creates a group's workdir with `configs.json`, its runs' configs, and refuses one that
  holds other runs (another grid or seed count over the same sweep workdir), as a run's
  workdir refuses another config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'configs.json')
  if not os.path.exists(path):
    workdir_lib.write_json_atomic(path, [c.to_dict() for c in configs])
    return
  saved = workdir_lib.read_json(path, 'use another --workdir for this sweep')
  if len(saved) != len(configs):
    raise ConfigError(f'sweep group {workdir!r} holds {len(saved)} runs, this sweep puts '
                      f'{len(configs)} there (another grid or --seeds); use another --workdir')
  for r, (old, config) in enumerate(zip(saved, configs)):
    differences = workdir_lib.config_differences(old, config)
    if differences:
      raise ConfigError(f'sweep group {workdir!r} holds other runs (run {r}: '
                        f'{workdir_lib.describe_differences(differences)}); use another --workdir')


def run_group(configs, workdir, teacher, generator, student, teacher_vars, channels,
              num_classes, test_images, test_labels):
  """All runs of one group, vmapped; returns [{'test_accuracy', 'generated_agreement'}]."""
  prepare_group_workdir(configs, workdir)
  with metrics.MetricsLog(workdir) as log:
    gen_vars, student_vars, seconds = methods.get(configs[0].method).train_group(base.Group(
        configs=configs, unit_configs=[_unit_learning_rates(c) for c in configs],
        teacher=teacher, generator=generator, student=student, channels=channels,
        num_classes=num_classes, stage=_group_stage(configs, workdir, teacher_vars, log)))
  results = []
  for r, config in enumerate(configs):
    g, s = _unstack(gen_vars, r), _unstack(student_vars, r)
    results.append({
        'test_accuracy': evaluation.evaluate(student, s, test_images, test_labels,
                                             config.eval_batch_size),
        'generated_agreement': evaluation.generated_agreement(
            generator, g, teacher, teacher_vars, student, s, config.generator.latent_dim,
            stages.stage_key(config, 'fidelity'),
            num_samples=config.student.agreement_samples, **evaluation.sampling(config))})
  return results, seconds


def run_cost(config, seconds: float, whose: str) -> Dict[str, Any]:
  """What a run cost: its training seconds (the generator and student stages, or DAFL's
  joint stage; over every call of a resumed run) and the generated samples its generator
  and its student were trained on. `whose` is 'its own' (a run alone) or 'group share'
  (a vmapped group's seconds divided by its runs)."""
  return {'training_seconds': float(seconds), 'seconds_are': whose,
          **methods.get(config.method).cost(config)}


def finished_report(config, workdir: str, teacher_fingerprint: str):
  """The report.json of a run that finished in `workdir` with this config and teacher, or
  None. The teacher is compared by fingerprint, not by its path, so that the finished runs
  of a sweep, copied (config.json and report.json) into a workdir on another machine, are
  taken as they are and not run again."""
  paths = [os.path.join(workdir, name) for name in ('config.json', 'report.json')]
  if not all(os.path.exists(p) for p in paths):
    return None
  try:
    saved, report = (workdir_lib.read_json(p, '') for p in paths)
  except ConfigError:
    return None  # Damaged: the run resumes from its checkpoints, or refuses to.
  differences = workdir_lib.config_differences(saved, config)
  differences.pop('teacher.checkpoint', None)
  if (differences or 'timing' not in report  # 'timing' is written last, by a whole call.
      or report.get('teacher', {}).get('fingerprint') != teacher_fingerprint):
    return None
  return report


def use_vmap(flag: Optional[bool], platform: str) -> bool:
  """--vmap/--novmap as given; unset: vmap everywhere but on CPU."""
  return flag if flag is not None else platform != 'cpu'


def _summary(values):
  values = np.asarray(values, np.float64)
  return {'n': int(values.size), 'mean': float(values.mean()), 'std': float(values.std()),
          'min': float(values.min()), 'max': float(values.max())}


def summary_table(result) -> str:
  """Markdown: student test accuracy per setting and overall."""
  lines = ['| method | setting | seeds | mean | std | min | max | training s per run | '
           'student samples |', '|---|---|---|---|---|---|---|---|---|']
  rows = result['summary'] + [dict(result['overall'], settings='overall')]
  for row in rows:
    setting = row['settings'] if isinstance(row['settings'], str) else (
        ', '.join(f'{k}={v}' for k, v in row['settings'].items()) or '(base config)')
    cost = (f"{row['training_seconds']:.0f} | {row['student_samples']:,}"
            if 'training_seconds' in row else ' | ')
    lines.append(f"| {result['method']} | {setting} | {row['n']} | {row['mean']:.4f} | "
                 f"{row['std']:.4f} | {row['min']:.4f} | {row['max']:.4f} | {cost} |")
  return '\n'.join(lines)


def sweep(config, workdir: str, seeds: int, grid_text: str, vmap: bool = True):
  """Runs the sweep (resuming what is done) and returns the sweep.json content."""
  if seeds < 1:
    raise ConfigError(f'--seeds={seeds}: expected a positive count')
  if not config.dataset:
    raise ConfigError("config.dataset='': a sweep compares students' test accuracy, so it "
                      'needs a dataset with a test split')
  with workdir_lib.WorkdirLock(workdir):
    return _sweep(config, workdir, seeds, grid_text, vmap)


def _sweep(config, workdir, seeds, grid_text, vmap):
  """sweep's work, with the sweep's workdir locked."""
  grid = parse_grid(grid_text)
  if vmap and not hasattr(methods.get(config.method), 'train_group'):
    raise ConfigError(f'config.method={config.method!r} with --vmap: expected --novmap (its '
                      'runs are run one by one; vmapped groups are for generator methods)')
  if vmap and config.generator.checkpoint:
    raise ConfigError(f'config.generator.checkpoint={config.generator.checkpoint!r} with '
                      "--vmap: expected '' (a vmapped group trains its generators; --novmap "
                      'runs each through the pipeline, which reads it)')
  config = copy.deepcopy(config)
  config.parallel = 'none'  # One device; the runs themselves are the batch axis.
  runs = run_configs(config, seeds, grid)
  for _, _, run in runs:
    config_checks.validate(run, 1)
  os.makedirs(workdir, exist_ok=True)
  teacher_dir = os.path.join(workdir, 'teacher')
  workdir_lib.prepare_workdir(config, teacher_dir)
  config, notes = data.resolve_dataset_fields(config, teacher_dir,
                                              bool(config.teacher.checkpoint))
  num_classes, channels = notes['num_classes'], notes['channels']
  teacher, generator, student = stages.build_networks(config, num_classes, channels)
  par = train.setup_parallel(config)
  with metrics.MetricsLog(teacher_dir) as log:
    teacher_vars, teacher_report = train.teacher_variables(config, teacher_dir, par, teacher,
                                                           log, channels)
  test_images, test_labels = data.load_split(config, config.test_split, config.test_examples)
  teacher_report['test_accuracy'] = evaluation.evaluate(teacher, teacher_vars, test_images,
                                                        test_labels, config.eval_batch_size)
  teacher_path = (os.path.abspath(config.teacher.checkpoint) if config.teacher.checkpoint
                  else os.path.join(os.path.abspath(teacher_dir), 'teacher_variables'))
  for _, _, run in runs:  # Every run starts from the shared teacher and resolved fields.
    run.teacher.checkpoint = teacher_path
    run.image_size, run.mean, run.std = config.image_size, config.mean, config.std

  results: List[Dict[str, Any]] = [None] * len(runs)
  seconds = {}
  t0 = time.perf_counter()
  if vmap:
    groups: Dict[str, List[int]] = {}
    for i, (_, _, run) in enumerate(runs):
      groups.setdefault(group_key(run), []).append(i)
    for g, members in enumerate(groups.values()):
      out, seconds[f'group{g}'] = run_group(
          [runs[i][2] for i in members], os.path.join(workdir, 'groups', str(g)), teacher,
          generator, student, teacher_vars, channels, num_classes, test_images, test_labels)
      share = sum(seconds[f'group{g}'].values()) / len(members)
      for i, result in zip(members, out):
        results[i] = dict(result, group=g, **run_cost(runs[i][2], share, 'group share'))
  else:
    fingerprint = teacher_lib.fingerprint(teacher_vars)
    for i, (_, _, run) in enumerate(runs):
      run_dir = os.path.join(workdir, 'runs', str(i))
      report = (finished_report(run, run_dir, fingerprint)
                or train.train_and_evaluate(run, run_dir))
      seconds[f'run{i}'] = {k: report[k]['seconds']
                            for k in methods.get(run.method).STAGES}
      results[i] = {'test_accuracy': report['student']['test_accuracy'],
                    'generated_agreement': report['student']['generated_agreement'],
                    **run_cost(run, sum(seconds[f'run{i}'].values()), 'its own'),
                    'cpu': report.get('machine', {}).get('cpu', '')}  # Where it ran.
  total_seconds = time.perf_counter() - t0

  per_run = [{'settings': settings, 'seed': seed, **result}
             for (settings, seed, _), result in zip(runs, results)]
  summary = []
  for settings in grid:
    rows = [r for r in per_run if r['settings'] == settings]
    summary.append({'settings': settings, **_summary([r['test_accuracy'] for r in rows]),
                    'training_seconds': float(np.mean([r['training_seconds'] for r in rows])),
                    'student_samples': rows[0]['student_samples']})
  result = {
      'method': config.method, 'dataset': config.dataset, 'preset': config.preset,
      'seeds': seeds, 'grid': grid_text, 'vmap': vmap, 'platform': jax.default_backend(),
      'machine': train.machine(),
      'teacher': teacher_report, 'runs': per_run, 'summary': summary,
      'overall': _summary([r['test_accuracy'] for r in per_run]),
      'seconds': {'total (all runs, after the teacher)': total_seconds, **seconds},
      'config': config.to_dict()}
  workdir_lib.write_json_atomic(os.path.join(workdir, 'sweep.json'), result)
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(summary_table(result) + '\n')
  return result


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally :preset.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the sweep.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per setting (config.seed, +1, ...).')
_GRID = flags.DEFINE_string('grid', '', "Settings: 'field=v1,v2;field2=w1,w2' (product).")
_VMAP = flags.DEFINE_bool(
    'vmap', None, 'Batch runs that share shapes with jax.vmap (--vmap) or run them one by '
    'one (--novmap). Default: vmap on GPU/TPU, one by one on CPU, where the vmapped steps '
    'measured slower (README, "Sweep speed").')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  result = run_reporting_errors(lambda: sweep(
      _CONFIG.value, _WORKDIR.value, _SEEDS.value, _GRID.value,
      use_vmap(_VMAP.value, jax.default_backend())))
  print(summary_table(result))


if __name__ == '__main__':
  app.run(main)
