"""The generator stage end to end, as the pipeline runs it, against a saved teacher.

    python -m benchmarks.generator_stage --config=configs/mnist.py \
        --config.teacher.checkpoint=RUN/teacher_variables --workdir=W

Runs the stage of `rdskd_jax.train` (same step, checkpoints, metrics.jsonl and progress
lines; resumable) for the config's `generator.steps`, without reading any dataset, and
prints one JSON line: steps, batch, the stage's seconds (compilation included) and the
wall seconds around it, the last logged losses, and the teacher's class shares on 4,096
generated samples. Writes `W/samples.png`.
Made for accelerators, where the whole paper-preset stage takes seconds to minutes.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rdskd_jax import metrics, plot, runner, stages, train
from rdskd_jax.methods import rdskd
from rdskd_jax import teacher as teacher_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mnist.py', 'Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Classes of the teacher.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  config = _CONFIG.value
  par = train.setup_parallel(config)
  channels = len(config.mean)
  teacher, generator, _ = stages.build_networks(config, _NUM_CLASSES.value, channels)
  teacher_vars = teacher_lib.restore_teacher(config, teacher, channels)
  state, step_fn = rdskd.generator_setup(config, generator, teacher)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  log = metrics.MetricsLog(_WORKDIR.value)
  t0 = time.perf_counter()
  state, seconds = runner.run_stage('generator', config, _WORKDIR.value, par, state,
                                    {'teacher': teacher_vars}, step_fn,
                                    config.generator.steps, log,
                                    stages.stage_key(config, 'generator'))
  wall = time.perf_counter() - t0
  rows = [json.loads(line) for line in open(log.path) if '"generator"' in line]
  gen_vars = {'params': state['params'], 'batch_stats': state['batch_stats']}
  z = jax.random.normal(jax.random.key(0), (4096, config.generator.latent_dim))
  logits, _ = teacher.apply(teacher_vars, generator.apply(gen_vars, z, train=False))
  shares = np.bincount(np.asarray(logits.argmax(-1)), minlength=_NUM_CLASSES.value) / 4096
  last = rows[-1]
  print(json.dumps({
      'stage': 'generator', 'steps': config.generator.steps,
      'batch': config.generator.batch_size, 'dtype': config.dtype,
      'parallel': config.parallel, 'devices': par.num_devices,
      'platform': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
      'stage_seconds': seconds, 'wall_seconds': wall,
      'last_losses': {k: v for k, v in last.items() if k not in ('stage', 'step')},
      'teacher_class_shares': [round(float(s), 4) for s in shares]}), flush=True)
  plot.save_samples(os.path.join(_WORKDIR.value, 'samples.png'), generator, gen_vars,
                     teacher, teacher_vars, config.generator.latent_dim, config,
                     jax.random.key(1))


if __name__ == '__main__':
  app.run(main)
