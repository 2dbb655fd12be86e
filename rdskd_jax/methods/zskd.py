"""ZSKD, Zero-Shot Knowledge Distillation (Nayak et al., ICML 2019): no generator. The
first steps each optimise one batch of data impressions from noise towards soft targets
drawn from a Dirichlet over the teacher's class similarity; the later steps train the
student on the complete, augmented set (`methods/synthesis.py`). Its settings:
config.zskd (rdskd_jax/methods/__init__.py).
"""

import functools

import jax
import jax.numpy as jnp

from rdskd_jax import config_checks, losses, models, stages, train_steps
from rdskd_jax.methods import base
from rdskd_jax.methods import synthesis as synthesis_lib

NAME = 'zskd'
STAGES = (NAME,)
BATCHNORM_PRIOR_FIELDS = ()


def data_impressions(key, teacher, teacher_vars, similarity, batch_index, *, shape,
                     iterations, learning_rate, temperature, betas, dtype, axis_name):
  """ZSKD's data impressions of one batch (Nayak et al., ICML 2019, Sec. 3.2; Algorithm
  1): the batch's class k and Dirichlet scale beta follow the batch index (the classes in
  turn, then the next scale), each row's soft target y is drawn from
  Dir(losses.dirichlet_concentration(C[k], beta)), C the teacher's class similarity, and
  inputs drawn from N(0, 1) take `iterations` Adam steps (`train_steps.optimise_inputs`) on
  losses.soft_target_cross_entropy(teacher(x), y, temperature), the teacher in inference
  mode. Returns this device's rows of the best inputs and the metrics."""
  num_classes = similarity.shape[0]
  k = batch_index % num_classes
  beta = jnp.asarray(betas, jnp.float32)[(batch_index // num_classes) % len(betas)]
  concentration = losses.dirichlet_concentration(similarity[k], beta)
  targets = train_steps.global_slice(
      jax.random.dirichlet(jax.random.fold_in(key, 1), concentration, (shape[0],)), axis_name)
  x = train_steps.global_slice(jax.random.normal(jax.random.fold_in(key, 0), shape, dtype),
                               axis_name)

  def loss_fn(images, iteration):
    del iteration
    logits, _ = teacher.apply(teacher_vars, images, train=False)
    loss = losses.soft_target_cross_entropy(logits, targets, temperature, axis_name=axis_name)
    return loss, {'impression': loss}

  return train_steps.optimise_inputs(x, loss_fn, iterations=iterations, learning_rate=learning_rate,
                                     axis_name=axis_name)


def step(state, frozen, root_key, *, teacher, student, tx_student, shape, batches,
         synthesis, augmentation, student_updates, student_batch_size, temperature,
         axis_name):
  """One step of ZSKD (Nayak et al. 2019): the first `batches` steps each make one batch
  of data impressions (`data_impressions`) and store it in the bank; each later step
  takes `student_updates` KD steps of the student on batches drawn uniformly from the
  whole set, which is complete by then, as the paper distils after synthesising, each
  batch augmented by `train_steps.shift_and_flip(**augmentation)` as the paper augments the
  impressions. The step index picks the branch (lax.cond), so every step is one program;
  the metrics of the branch not taken are 0.
  """
  key = jax.random.fold_in(root_key, state['step'])
  student = student.clone(axis_name=axis_name)
  empty = {'impression': jnp.zeros((), jnp.float32), 'best_total': jnp.zeros((), jnp.float32),
           'total': jnp.zeros((), jnp.float32), 'kd': jnp.zeros((), jnp.float32)}

  def synthesise(state):
    best, parts = data_impressions(jax.random.fold_in(key, 0), teacher, frozen['teacher'],
                                   frozen['similarity'], state['step'], shape=shape,
                                   axis_name=axis_name, **synthesis)
    bank, finite = synthesis_lib.store_batch(state['bank'], best, state['step'], axis_name)
    metrics = jax.tree.map(lambda a, b: a.astype(b.dtype), dict(empty, **parts), empty)
    return synthesis_lib.next_state(state, bank, state['student'], finite), metrics

  def distil(state):
    s_state, kd = synthesis_lib.distil_on_bank(
        state['student'], jax.random.fold_in(key, 1), state['bank'], batches * shape[0],
        teacher=teacher, teacher_vars=frozen['teacher'], student=student,
        tx_student=tx_student, updates=student_updates, batch_size=student_batch_size,
        temperature=temperature, axis_name=axis_name,
        augment=functools.partial(train_steps.shift_and_flip, **augmentation))
    return (synthesis_lib.next_state(state, state['bank'], s_state, True),
            dict(empty, kd=kd.astype(jnp.float32)))

  return jax.lax.cond(state['step'] < batches, synthesise, distil, state)


def setup(config, channels: int, num_classes: int, teacher, student):
  """The stage's initial state and its per-device step."""
  del num_classes
  block = config.zskd
  state, kd, dtype = synthesis_lib.initial_state(config, block, channels, teacher, student)
  impressions = {k: block[k] for k in ('iterations', 'learning_rate', 'temperature')}
  return state, functools.partial(
      step, batches=block.steps, synthesis=dict(impressions, betas=tuple(block.betas),
                                                dtype=dtype),
      augmentation={'max_shift': block.max_shift, 'flip': block.flip,
                    'fill': stages.black_pixel(config)}, **kd)


def frozen(config, teacher_vars, num_classes: int):
  """The teacher, and its class similarity matrix (from the final layer's weights)."""
  del config
  kernel = models.final_kernel(teacher_vars['params'], num_classes)
  return {'teacher': teacher_vars,
          'similarity': losses.class_similarity(jnp.asarray(kernel, jnp.float32))}


def stage_steps(config) -> int:
  """First every batch is synthesised, then as many steps distil."""
  return 2 * config.zskd.steps


def check(config, num_devices: int) -> None:
  """config.zskd's values (every run checks them), and the stage's needs when it runs."""
  for field in ('zskd.batch_size', 'zskd.steps', 'zskd.iterations'):
    config_checks.positive_int(config, field)
  for field in ('zskd.learning_rate', 'zskd.temperature'):
    config_checks.positive_float(config, field)
  config_checks.require(len(config.zskd.betas) > 0 and all(b > 0 for b in config.zskd.betas),
                        'zskd.betas', config.zskd.betas, 'one or more positive Dirichlet scales')
  config_checks.pixel_shift(config, 'zskd')
  synthesis_lib.check(config, NAME, num_devices)


def train(ctx: base.Context) -> base.Outcome:
  return synthesis_lib.train(ctx, NAME, setup, frozen, stage_steps(ctx.config))


def restore(loader: base.Loader):
  return synthesis_lib.restore(loader, NAME, setup)


def cost(config):
  return synthesis_lib.cost(config, NAME)
