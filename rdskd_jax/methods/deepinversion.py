"""DeepInversion (Yin et al., CVPR 2020; the authors' cifar10/deepinversion_cifar10.py):
no generator. Each step optimises one batch of inputs from noise against the frozen
teacher (class loss, image priors, the BatchNorm prior and, for Adaptive DeepInversion,
competition with the student), adds it to the synthesised set, and trains the student on
that set so far (`methods/synthesis.py`). Its settings: config.deepinversion
(rdskd_jax/methods/__init__.py).
"""

import functools

import jax
import jax.numpy as jnp

from rdskd_jax import config_checks, losses, train_steps
from rdskd_jax.methods import base
from rdskd_jax.methods import synthesis as synthesis_lib

NAME = 'deepinversion'
STAGES = (NAME,)
BATCHNORM_PRIOR_FIELDS = ('deepinversion.bn_weight',)


def synthesize_batch(key, teacher, teacher_vars, student, student_vars, *, shape, num_classes,
                     iterations, learning_rate, jitter, class_weight, tv_weight, l2_weight,
                     bn_weight, competition_weight, competition_temperature, dtype, axis_name):
  """DeepInversion's synthesis of one batch (Yin et al., CVPR 2020, Eq. 8 with ADI's
  competition; the authors' cifar10/deepinversion_cifar10.py, `get_images`): inputs drawn
  from N(0, 1), labels 0, 1, ..., C-1, 0, 1, ... along the batch, then `iterations` Adam
  steps on the inputs (`train_steps.optimise_inputs`; both networks in inference mode), each on the
  batch rolled by offsets drawn uniformly from [-jitter, jitter] along height and width,
  of

    class_weight CE(teacher(x'), y) + tv_weight R_TV(x') + l2_weight ||x'||
      + bn_weight R_BN(x') + competition_weight (1 - JS(student(x'), teacher(x'))),

  x' the rolled batch, every term over the global batch. Returns this device's rows of
  the best inputs and the metrics.
  """
  batch = shape[0]
  labels = train_steps.global_slice(jnp.arange(batch) % num_classes, axis_name)
  x = train_steps.global_slice(jax.random.normal(jax.random.fold_in(key, 0), shape, dtype),
                               axis_name)

  def loss_fn(images, iteration):
    shift = jax.random.randint(jax.random.fold_in(key, iteration + 1), (2,), -jitter,
                               jitter + 1)
    rolled = jnp.roll(images, (shift[0], shift[1]), axis=(1, 2))
    logits, _, bn = train_steps.teacher_forward(teacher, teacher_vars, rolled,
                                                bn_prior=bn_weight > 0, axis_name=axis_name)
    parts = {'class': losses.cross_entropy_loss(logits, labels, axis_name=axis_name),
             'tv': losses.total_variation(rolled, axis_name=axis_name),
             'l2': losses.image_l2(rolled, axis_name=axis_name), 'bn_prior': bn}
    total = (class_weight * parts['class'] + tv_weight * parts['tv']
             + l2_weight * parts['l2'] + bn_weight * bn)
    if competition_weight > 0:
      student_logits, _ = student.apply(student_vars, rolled, train=False)
      parts['competition'] = losses.competition_loss(
          student_logits, jax.lax.stop_gradient(logits), competition_temperature,
          axis_name=axis_name)
      total = total + competition_weight * parts['competition']
    return total, parts

  return train_steps.optimise_inputs(x, loss_fn, iterations=iterations, learning_rate=learning_rate,
                                     axis_name=axis_name)


def step(state, frozen, root_key, *, teacher, student, tx_student, shape,
         num_classes, synthesis, student_updates, student_batch_size,
         temperature, axis_name):
  """One step of DeepInversion's distillation: synthesise a batch (`synthesize_batch`,
  against the current student when the competition term is weighted), store it in the
  image bank at the next free rows, then `student_updates` KD steps of the student on
  batches drawn uniformly from the rows filled so far (as zju-vipa/DataFree's
  DeepInvSynthesizer trains its student from its pool as it grows).
  """
  key = jax.random.fold_in(root_key, state['step'])
  student = student.clone(axis_name=axis_name)
  best, parts = synthesize_batch(
      jax.random.fold_in(key, 0), teacher, frozen['teacher'], student,
      jax.lax.stop_gradient(train_steps.variables_of(state['student'])), shape=shape,
      num_classes=num_classes, axis_name=axis_name, **synthesis)
  bank, finite = synthesis_lib.store_batch(state['bank'], best, state['step'], axis_name)
  s_state, kd = synthesis_lib.distil_on_bank(
      state['student'], jax.random.fold_in(key, 1), bank, (state['step'] + 1) * shape[0],
      teacher=teacher, teacher_vars=frozen['teacher'], student=student,
      tx_student=tx_student, updates=student_updates, batch_size=student_batch_size,
      temperature=temperature, axis_name=axis_name)
  return synthesis_lib.next_state(state, bank, s_state, finite), dict(parts, kd=kd)


def setup(config, channels: int, num_classes: int, teacher, student):
  """The stage's initial state and its per-device step."""
  block = config.deepinversion
  state, kd, dtype = synthesis_lib.initial_state(config, block, channels, teacher, student)
  weights = {k: block[k] for k in ('iterations', 'learning_rate', 'jitter', 'class_weight',
                                   'tv_weight', 'l2_weight', 'bn_weight',
                                   'competition_weight', 'competition_temperature')}
  return state, functools.partial(step, num_classes=num_classes,
                                  synthesis=dict(weights, dtype=dtype), **kd)


def frozen(config, teacher_vars, num_classes: int):
  del config, num_classes
  return {'teacher': teacher_vars}


def stage_steps(config) -> int:
  """Each step synthesises a batch and distils."""
  return config.deepinversion.steps


def check(config, num_devices: int) -> None:
  """config.deepinversion's values (every run checks them), and the stage's needs when it runs."""
  for field in ('deepinversion.batch_size', 'deepinversion.steps',
                'deepinversion.iterations'):
    config_checks.positive_int(config, field)
  for field in ('deepinversion.jitter', 'deepinversion.class_weight', 'deepinversion.tv_weight',
                'deepinversion.l2_weight', 'deepinversion.bn_weight',
                'deepinversion.competition_weight'):
    config_checks.non_negative(config, field)
  for field in ('deepinversion.learning_rate', 'deepinversion.competition_temperature'):
    config_checks.positive_float(config, field)
  synthesis_lib.check(config, NAME, num_devices)


def train(ctx: base.Context) -> base.Outcome:
  return synthesis_lib.train(ctx, NAME, setup, frozen, stage_steps(ctx.config))


def restore(loader: base.Loader):
  return synthesis_lib.restore(loader, NAME, setup)


def cost(config):
  return synthesis_lib.cost(config, NAME)
