"""Compilation time of a classifier's train step, on one device and data-parallel.

    python -m benchmarks.compile_time --model=resnet34 --width=0.125 --devices=1,2,8

Prints one JSON object per line and nothing else on stdout: {"model", "width", "devices",
"parallel", "compile_seconds", "hlo_lines", "all_reduces", "xla_flags"}: the teacher step
(`train_steps.teacher_step`, batch 8 a device) wrapped as the stages wrap it
(`parallel.DataParallel`, pmap), lowered and compiled with the persistent cache off;
"hlo_lines" counts the optimised program's lines. A data-parallel step that compiles much
longer than the one-device step, with many more lines, is the symptom tests/README.md
describes (a scalar chain copied into every fused update).

Without XLA_FLAGS in the environment it uses the test suite's flags
(`tests/conftest.xla_flags`) and as many fake CPU devices as the largest count asked.
"""

import functools
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(model_name: str, width: float, devices: int) -> dict:
  """Compiles one data-parallel teacher step on `devices` devices and times it."""
  import jax
  import numpy as np
  import optax

  from rdskd_jax import models, parallel, train_steps

  model = models.create_classifier(model_name, 10, width=width)
  params, other = train_steps.classifier_init(model, jax.random.key(0), (32, 32, 3))
  tx = optax.sgd(0.1, 0.9)
  par = parallel.DataParallel('pmap', devices)
  step = par.wrap(functools.partial(train_steps.teacher_step, model=model, tx=tx),
                  num_batch_args=2)
  state = par.replicate(train_steps.new_train_state(params, tx, **other))
  images = par.split_batch(np.zeros((8 * devices, 32, 32, 3), np.float32))
  labels = par.split_batch(np.zeros((8 * devices,), np.int32))
  lowered = step.lower(state, {}, jax.random.key(1), images, labels)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  return {'model': model_name, 'width': width, 'devices': devices, 'parallel': 'pmap',
          'compile_seconds': round(seconds, 2), 'hlo_lines': len(text.splitlines()),
          'all_reduces': text.count(' all-reduce('),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def main(argv) -> int:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='resnet34')
  parser.add_argument('--width', type=float, default=0.125)
  parser.add_argument('--devices', default='1,2', help='comma-separated device counts')
  args = parser.parse_args(argv)
  counts = [int(n) for n in args.devices.split(',')]
  if 'XLA_FLAGS' not in os.environ:
    sys.path.insert(0, os.path.join(_ROOT, 'tests'))
    import conftest  # The suite's flags; it sets XLA_FLAGS for 8 devices by default.
    os.environ['XLA_FLAGS'] = conftest.xla_flags(max(counts))
  os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  for n in counts:
    print(json.dumps(measure(args.model, args.width, n)), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
