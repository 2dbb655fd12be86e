"""Variants of the student stage on MNIST, scored on a validation slice of the train split
(train[50000:], images the teacher trained on), never the test split.

    python -m benchmarks.explore.student_variants --tag=T --teacher=W/teacher_variables \
        [--generator_batchnorm=batch] [--shift=2] [--mixup=0.5] [--snapshots=4] \
        [--temperature=4] [--literal] [--sample=literal|subpixel] [--seed=S]

The `cpu` preset's generator (120 steps) and a student of --steps steps (cosine, Adam 4e-3,
batch 256), with one change at a time to how the student's batch is made:
  --generator_batchnorm  the config field of that name ('running' or 'batch').
  --shift N              each generated image translated by up to N pixels (edge padding).
  --mixup F              the first F of the batch replaced by mixes lam x_i + (1-lam) x_i+1,
                         lam ~ U(0, 1); the teacher labels the mixed images.
  --snapshots K          K generators saved along the generator's stage; step t samples the
                         (t mod K)-th.
  --temperature T        the KD temperature.
  --literal              the generator computed literally (subpixel=False; same parameters).
  --sample FORM          the form that draws the student's images from the trained generator
                         ('same': the form it trained in; 'literal' or 'subpixel').
  --perturb E            the generator's initial parameters multiplied by 1 + E: with E near
                         float32's epsilon, a change of the size of rounding.
The student's noise comes from fold_in(stage key, step) split five ways, so the no-change
run is not bit-equal to the pipeline's student stage. Appends one JSON line per run to
--results.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import mnist
from rdskd_jax import data, losses, models, train

p = argparse.ArgumentParser()
p.add_argument('--tag', required=True)
p.add_argument('--teacher', required=True, help='a teacher_variables directory')
p.add_argument('--seed', type=int, default=0)
p.add_argument('--generator_steps', type=int, default=120)
p.add_argument('--steps', type=int, default=1000)
p.add_argument('--learning_rate', type=float, default=4e-3)
p.add_argument('--evals', type=int, default=4)
p.add_argument('--generator_batchnorm', default='running', choices=models.GENERATOR_BATCHNORM)
p.add_argument('--shift', type=int, default=0)
p.add_argument('--mixup', type=float, default=0.0)
p.add_argument('--snapshots', type=int, default=1)
p.add_argument('--temperature', type=float, default=10.0)
p.add_argument('--literal', action='store_true')
p.add_argument('--sample', default='same', choices=['same', 'literal', 'subpixel'])
p.add_argument('--perturb', type=float, default=0.0)
p.add_argument('--results', default='benchmarks/explore/student_variants.jsonl')
a = p.parse_args()

config = mnist.get_config('cpu')
config.teacher.checkpoint = a.teacher
config.seed = a.seed
config.generator.steps = a.generator_steps
config.generator.subpixel = not a.literal
config.student.steps, config.student.learning_rate = a.steps, a.learning_rate
teacher, generator, student = train.build_networks(config, 10, 1)
sampler = generator if a.sample == 'same' else generator.clone(subpixel=a.sample == 'subpixel')
teacher_vars = train.restore_teacher(config, teacher, 1)
images, labels = data.load_split(config, 'train')
val_x, val_y = images[50000:], labels[50000:]
teacher_val = float(np.mean(np.asarray(train._predict(teacher, teacher_vars, val_x)) == val_y))
print(a.tag, 'teacher val acc', teacher_val, flush=True)


def stage_key(stage):
  return jax.random.fold_in(jax.random.key(config.seed), train._STAGE_KEYS[stage])


t0 = time.perf_counter()
state, step_fn = train.generator_setup(config, generator, teacher)
state['params'] = jax.tree.map(lambda x: x * (1 + a.perturb), state['params'])
step = jax.jit(lambda s, f, k: step_fn(s, f, k, axis_name=None), donate_argnums=0)
snapshots, every = [], a.generator_steps // a.snapshots
for i in range(a.generator_steps):
  state, metrics = step(state, {'teacher': teacher_vars}, stage_key('generator'))
  if (i + 1) % every == 0:
    snapshots.append(jax.device_get(train.variables_of(state)))
generator_vars = snapshots[-1]
stacked = jax.tree.map(lambda *x: jnp.stack(x), *snapshots)
generator_seconds = time.perf_counter() - t0


def shifted(key, x, m):
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode='edge')
  offsets = jax.random.randint(key, (n, 2), 0, 2 * m + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)


t1 = time.perf_counter()
state, _ = train.student_setup(config, 1, generator, teacher, student)
scfg = config.student
tx = train._optimizer(scfg, scfg.steps, scfg.epoch_length)
batch = scfg.batch_size


def student_step(state, frozen, root_key):
  key = jax.random.fold_in(root_key, state['step'])
  k_noise, k_shift, _, k_mix, _ = jax.random.split(key, 5)
  z = jax.random.normal(k_noise, (batch, config.generator.latent_dim))
  gen_vars = jax.tree.map(lambda x: x[state['step'] % a.snapshots], frozen['generators'])
  x = models.generate(sampler, gen_vars, z, a.generator_batchnorm)
  if a.shift:
    x = shifted(k_shift, x, a.shift)
  if a.mixup:
    lam = jax.random.uniform(k_mix, (batch, 1, 1, 1))
    mixed = lam * x + (1 - lam) * jnp.roll(x, 1, axis=0)
    x = jnp.where((jnp.arange(batch) < int(a.mixup * batch))[:, None, None, None], mixed, x)
  teacher_logits, _ = teacher.apply(frozen['teacher'], x, train=False)

  def loss_fn(params):
    (logits, _), parts = train._train_forward(student, state, params, x)
    return losses.kd_loss(logits, teacher_logits, a.temperature), parts

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  return train._apply_gradients(state, grads, tx, None, loss, **parts), {'kd': loss}


step = jax.jit(student_step, donate_argnums=0)
frozen = {'teacher': teacher_vars, 'generators': stacked}
rows = []
for i in range(a.steps):
  state, metrics = step(state, frozen, stage_key('student'))
  if (i + 1) % (a.steps // a.evals) == 0:
    student_vars = train.variables_of(state)
    accuracy = train.evaluate(student, student_vars, val_x, val_y, 1000)
    agreement = train.generated_agreement(
        sampler, generator_vars, teacher, teacher_vars, student, student_vars, 100,
        jax.random.key(99), 2048, batchnorm=a.generator_batchnorm)
    rows.append((i + 1, accuracy, agreement, float(metrics['kd'])))
    print(a.tag, 'student', *rows[-1], flush=True)
out = dict(vars(a), teacher_val_accuracy=teacher_val, generator_seconds=generator_seconds,
           student_seconds=time.perf_counter() - t1, res=rows)
with open(a.results, 'a') as f:
  f.write(json.dumps(out) + '\n')
print(a.tag, 'DONE', json.dumps(out), flush=True)
