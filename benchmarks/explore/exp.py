"""Preset exploration on MNIST: accuracy on a validation slice of the train split
(train[50000:], images the teacher trained on), never the test split.

    python -m benchmarks.explore.exp --tag=T --teacher=W/teacher_variables [options]

Appends one JSON line per run to --results. The rows in results.jsonl ran on the code of
7f10e45, whose networks started from Flax's default initialisation: there, --torch_init
and --student_torch_init re-drew the generator's and the student's parameters as PyTorch
does (since then the default). --flax_init re-draws them as Flax's default.
"""
import argparse, functools, json, time
import jax, numpy as np
from rdskd_jax import train, data
from configs import mnist

p = argparse.ArgumentParser()
p.add_argument('--tag', required=True)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--gen_steps', type=int, default=240)
p.add_argument('--gen_batch', type=int, default=256)
p.add_argument('--gen_lr', type=float, default=1e-3)
p.add_argument('--epoch_length', type=int, default=40)
p.add_argument('--st_steps', type=int, default=1000)
p.add_argument('--st_batch', type=int, default=256)
p.add_argument('--st_lr', type=float, default=4e-3)
p.add_argument('--st_schedule', default='cosine')
p.add_argument('--evals', type=int, default=4)
p.add_argument('--torch_init', action='store_true')
p.add_argument('--student_torch_init', action='store_true')
p.add_argument('--save', default='')
p.add_argument('--load_gen', default='')
p.add_argument('--flax_init', action='store_true')
p.add_argument('--teacher', required=True, help='a teacher_variables directory')
p.add_argument('--results', default='benchmarks/explore/results.jsonl')
a = p.parse_args()

config = mnist.get_config('cpu')
config.teacher.checkpoint = a.teacher
config.seed = a.seed
g = config.generator; g.steps, g.batch_size, g.learning_rate, g.epoch_length = a.gen_steps, a.gen_batch, a.gen_lr, a.epoch_length
s = config.student; s.steps, s.batch_size, s.learning_rate, s.schedule = a.st_steps, a.st_batch, a.st_lr, a.st_schedule
teacher, generator, student = train.build_networks(config, 10, 1)
tv = train.restore_teacher(config, teacher, 1)
images, labels = data.load_split(config, 'train')
vx, vy = images[50000:], labels[50000:]
tpred = np.asarray(train._predict(teacher, tv, vx))
print(a.tag, 'teacher val acc', (tpred == vy).mean(), flush=True)

def root(stage):
  return jax.random.fold_in(jax.random.key(config.seed), train._STAGE_KEYS[stage])

def redraw(params, seed, pytorch):
  """Every dense and conv layer re-drawn: PyTorch's default (weights and biases uniform in
  +-1/sqrt(fan_in), models.torch_*_init) or Flax's (LeCun-normal weights, zero biases).
  Leaf i draws from fold_in(key(seed), i) over the sorted leaves; BatchNorm is kept."""
  from flax import linen as nn, traverse_util
  from rdskd_jax import models
  flat = traverse_util.flatten_dict(params, sep='/')
  kernel_init = models.torch_kernel_init if pytorch else nn.initializers.lecun_normal()
  fans = {k.rsplit('/', 1)[0]: int(np.prod(v.shape[:-1])) for k, v in flat.items()
          if k.endswith('kernel')}
  for i, (k, v) in enumerate(sorted(flat.items())):
    key, layer = jax.random.fold_in(jax.random.key(seed), i), k.rsplit('/', 1)[0]
    if k.endswith('kernel'):
      flat[k] = kernel_init(key, v.shape)
    elif k.endswith('bias') and layer in fans:
      flat[k] = models.torch_bias_init(fans[layer])(key, v.shape) if pytorch else 0 * v
  return traverse_util.unflatten_dict(flat, sep='/')

t0 = time.perf_counter()
state, step_fn = train.generator_setup(config, generator, teacher)
if a.flax_init:
  state['params'] = redraw(state['params'], 3000 + a.seed, pytorch=False)
if a.torch_init:
  state['params'] = redraw(state['params'], 1000 + a.seed, pytorch=True)
step = jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=0)
frozen = {'teacher': tv}
rk = root('generator')
for i in range(0 if a.load_gen else a.gen_steps):
  state, m = step(state, frozen, rk)
  if (i + 1) % max(a.gen_steps // 4, 1) == 0:
    print(a.tag, 'gen', i + 1, {k: round(float(v), 4) for k, v in m.items()}, flush=True)
gv = train.variables_of(state)
if a.load_gen:
  import pickle; gv = pickle.load(open(a.load_gen, 'rb'))
tgen = time.perf_counter() - t0

t1 = time.perf_counter()
state, step_fn = train.student_setup(config, 1, generator, teacher, student)
if a.student_torch_init:
  state['params'] = redraw(state['params'], 2000 + a.seed, pytorch=True)
if a.flax_init:
  state['params'] = redraw(state['params'], 4000 + a.seed, pytorch=False)
if a.save:
  import pickle
  pickle.dump(jax.device_get(gv), open(a.save, 'wb'))
step = jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=0)
frozen = {'teacher': tv, 'generator': gv}
rk = root('student')
res = []
for i in range(a.st_steps):
  state, m = step(state, frozen, rk)
  if (i + 1) % (a.st_steps // a.evals) == 0:
    sv = train.variables_of(state)
    acc = train.evaluate(student, sv, vx, vy, 1000)
    ag = train.generated_agreement(generator, gv, teacher, tv, student, sv, 100, jax.random.key(99), 2048)
    res.append((i + 1, acc, ag, float(m['kd'])))
    print(a.tag, 'student', i + 1, 'val', round(acc, 4), 'agree', round(ag, 4), 'kd', round(float(m['kd']), 3), flush=True)
tst = time.perf_counter() - t1
out = dict(vars(a), gen_seconds=tgen, student_seconds=tst, res=res)
open(a.results, 'a').write(json.dumps(out) + '\n')
print(a.tag, 'DONE', json.dumps(out), flush=True)
