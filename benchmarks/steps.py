"""Times the generator and student train steps, as the pipeline builds them.

    python -m benchmarks.steps --config=configs/mnist.py --batch=512 --repeats=5 \
        [--steps_per_call=1,8] [--flops]

Prints one JSON object per line and nothing else on stdout:
{"step", "steps_per_call", "batch", "median_seconds", "min_seconds", "devices", "platform",
"dtype", "parallel", "framework", "dataset", "teacher", "student"}, seconds per step. Each
repeat is one call of the wrapped (jitted, data-parallel) program running
`steps_per_call` steps (`runner.fuse_steps`), timed after compilation and warm-up calls,
up to `block_until_ready` of the new state and metrics. `--flops` adds "flops_per_step"
(XLA's count for the one-device program of one step at the global batch, backward
included), "flops_per_second" (that count over the median step) and
"matmul_peak_flops_per_second" (the best of a square matmul in the config's dtype on one
device, the machine's measured peak). Networks are freshly initialised (the time does not
depend on the weights), so no dataset or teacher checkpoint is needed. Override the dtype
or the parallel mode through the config: `--config.dtype=bfloat16`, `--config.parallel=none`.
"""

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from rdskd_jax import models, runner, stages, train
from rdskd_jax.methods import rdskd

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mnist.py', 'Config file[:preset].')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch of both steps; 0: the config\'s.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed steps per step function.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_STEPS = flags.DEFINE_list('steps', ['generator', 'student'], 'Which steps to time.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Classes of the classifiers.')
_STEPS_PER_CALL = flags.DEFINE_list('steps_per_call', ['1'], 'Steps per call to time (K).')
_FLOPS = flags.DEFINE_bool('flops', False, "Add XLA's FLOP count and the matmul peak.")


def step_flops(step_fn, state, frozen, key) -> float:
  """XLA's FLOP count of one step as a one-device program."""
  compiled = jax.jit(functools.partial(step_fn, axis_name=None)).lower(
      state, frozen, key).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0]
  return float(analysis['flops'])


def matmul_peak(dtype, size=2048, repeats=5) -> float:
  """FLOP/s of the best of `repeats` size x size matmuls on one device."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * size ** 3 / best


def time_step(wrapped, state, frozen, key, repeats, warmup):
  """Per-step seconds of `repeats` calls after compilation and `warmup` calls."""
  for _ in range(1 + warmup):
    state, metrics = wrapped(state, frozen, key)
    jax.block_until_ready((state, metrics))
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = wrapped(state, frozen, key)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - t0)
  return seconds


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value:
    config.generator.batch_size = config.student.batch_size = _BATCH.value
  par = train.setup_parallel(config)
  channels = len(config.mean)
  if not channels or not config.image_size:
    raise app.UsageError('benchmarks.steps needs config.mean and config.image_size set (the '
                         'channels and size of the images); the generic config leaves them '
                         'to the dataset')
  teacher, generator, student = stages.build_networks(config, _NUM_CLASSES.value, channels)
  image = jnp.zeros((1, config.image_size, config.image_size, channels))
  teacher_vars = teacher.init(jax.random.key(1), image)
  gen_state, gen_step = rdskd.generator_setup(config, generator, teacher)
  gen_vars = {'params': gen_state['params'], 'batch_stats': gen_state['batch_stats']}
  student_state, student_step = rdskd.student_setup(config, channels, _NUM_CLASSES.value,
                                                    generator, teacher, student)
  runs = {'generator': (gen_step, gen_state, {'teacher': teacher_vars}),
          'student': (student_step, student_state,
                      {'teacher': teacher_vars, 'generator': gen_vars})}
  peak = matmul_peak(models.DTYPES[config.dtype]) if _FLOPS.value else None
  for name in _STEPS.value:
    if name not in runs:
      raise app.UsageError(f'--steps: unknown step {name!r}; expected generator, student')
    step_fn, state, frozen = runs[name]
    key = jax.random.key(config.seed)
    flops = step_flops(step_fn, state, frozen, key) if _FLOPS.value else None
    for k in (int(v) for v in _STEPS_PER_CALL.value):
      wrapped = par.wrap(runner.fuse_steps(step_fn, k))
      seconds = [s / k for s in time_step(wrapped, par.replicate(state), par.replicate(frozen),
                                          key, _REPEATS.value, _WARMUP.value)]
      row = {
          'step': name, 'steps_per_call': k, 'batch': config[name].batch_size,
          'median_seconds': statistics.median(seconds), 'min_seconds': min(seconds),
          'devices': par.num_devices, 'platform': jax.default_backend(),
          'dtype': config.dtype, 'parallel': config.parallel, 'framework': 'jax',
          'dataset': config.dataset, 'teacher': config.teacher.model,
          'student': config.student.model, 'reuse': config.student.reuse}
      if flops is not None:
        row.update(flops_per_step=flops, flops_per_second=flops / row['median_seconds'],
                   matmul_peak_flops_per_second=peak)
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
