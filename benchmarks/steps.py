"""Times the generator and student train steps, as the pipeline builds them.

    python -m benchmarks.steps --config=configs/mnist.py --batch=512 --repeats=5

Prints one JSON object per line and nothing else on stdout:
{"step", "batch", "median_seconds", "min_seconds", "devices", "platform", "dtype",
"parallel", "framework", "dataset", "teacher", "student"}. Each repeat is one step of
the wrapped (jitted, data-parallel) program, timed after compilation and warm-up steps,
up to `block_until_ready` of the new state and metrics. Networks are freshly initialised (the time does not depend on the
weights), so no dataset or teacher checkpoint is needed. Override the dtype or the
parallel mode through the config: `--config.dtype=bfloat16`, `--config.parallel=none`.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from rdskd_jax import stages, train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mnist.py', 'Config file[:preset].')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch of both steps; 0: the config\'s.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed steps per step function.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_STEPS = flags.DEFINE_list('steps', ['generator', 'student'], 'Which steps to time.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Classes of the classifiers.')


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
  gen_state, gen_step = stages.generator_setup(config, generator, teacher)
  gen_vars = {'params': gen_state['params'], 'batch_stats': gen_state['batch_stats']}
  student_state, student_step = stages.student_setup(config, channels, generator, teacher,
                                                    student)
  runs = {'generator': (gen_step, gen_state, {'teacher': teacher_vars}),
          'student': (student_step, student_state,
                      {'teacher': teacher_vars, 'generator': gen_vars})}
  for name in _STEPS.value:
    if name not in runs:
      raise app.UsageError(f'--steps: unknown step {name!r}; expected generator, student')
    step_fn, state, frozen = runs[name]
    seconds = time_step(par.wrap(step_fn), par.replicate(state), par.replicate(frozen),
                        jax.random.key(config.seed), _REPEATS.value, _WARMUP.value)
    print(json.dumps({
        'step': name, 'batch': config[name].batch_size,
        'median_seconds': statistics.median(seconds), 'min_seconds': min(seconds),
        'devices': par.num_devices, 'platform': jax.default_backend(),
        'dtype': config.dtype, 'parallel': config.parallel, 'framework': 'jax',
        'dataset': config.dataset, 'teacher': config.teacher.model,
        'student': config.student.model}), flush=True)


if __name__ == '__main__':
  app.run(main)
