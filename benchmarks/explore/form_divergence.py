"""How fast the sub-pixel and literal generators part in float32 training.

    python -m benchmarks.explore.form_divergence --teacher=W/teacher_variables [--steps=3]

Both forms start from the same parameters and see the same noise (the `cpu` preset's
generator stage, seed 0). For every step it prints, per parameter leaf, the relative
difference of the two forms' updates, |u_subpixel - u_literal| / |u_literal|, and the
difference of their losses. Prints only; nothing is written.
"""
import argparse

import jax
import numpy as np

from configs import mnist
from rdskd_jax import train

p = argparse.ArgumentParser()
p.add_argument('--teacher', required=True, help='a teacher_variables directory')
p.add_argument('--steps', type=int, default=3)
p.add_argument('--seed', type=int, default=0)
a = p.parse_args()


def trajectory(subpixel):
  """Parameters after each step (the initial ones first) and each step's loss."""
  config = mnist.get_config('cpu')
  config.teacher.checkpoint, config.seed = a.teacher, a.seed
  config.generator.subpixel = subpixel
  teacher, generator, _ = train.build_networks(config, 10, 1)
  frozen = {'teacher': train.restore_teacher(config, teacher, 1)}
  state, step_fn = train.generator_setup(config, generator, teacher)
  step = jax.jit(lambda s, f, k: step_fn(s, f, k, axis_name=None))
  key = jax.random.fold_in(jax.random.key(config.seed), train._STAGE_KEYS['generator'])
  params, totals = [jax.device_get(state['params'])], []
  for _ in range(a.steps):
    state, metrics = step(state, frozen, key)
    params.append(jax.device_get(state['params']))
    totals.append(float(metrics['total']))
  return params, totals


(fast, fast_loss), (literal, literal_loss) = trajectory(True), trajectory(False)
names = [jax.tree_util.keystr(path) for path, _ in
         jax.tree_util.tree_flatten_with_path(fast[0])[0]]
for t in range(a.steps):
  print(f'step {t + 1}: loss sub-pixel {fast_loss[t]:.7f} literal {literal_loss[t]:.7f}')
  moved = [jax.tree.leaves(jax.tree.map(lambda x, y: np.asarray(x) - y, run[t + 1], run[t]))
           for run in (fast, literal)]
  for name, u_fast, u_literal in zip(names, *moved):
    gap = np.linalg.norm(u_fast - u_literal) / np.linalg.norm(u_literal)
    print(f'  {name:32s} update difference {gap:.2e}')
