"""DAFL, Data-Free Learning of Student Networks (Chen et al., ICCV 2019; the authors'
DAFL_train.py): generator and student trained together in one stage. Each step the
generator takes a step on L_oh + alpha L_a + beta L_ie (`losses.dafl_generator_loss`)
against the frozen teacher, and the student a KD step on the same images. Its settings:
config.dafl (rdskd_jax/methods/__init__.py).
"""

import functools

import jax
import optax

from rdskd_jax import config_checks, losses, train_steps
from rdskd_jax.methods import base, joint

NAME = 'dafl'
STAGES = (NAME,)
BATCHNORM_PRIOR_FIELDS = ('generator.bn_prior_weight',)
LEARNING_RATES = {NAME: {'generator': 'dafl.generator_learning_rate',
                         'student': 'dafl.student_learning_rate'}}


def step(state, frozen, root_key, *, generator, teacher, student, tx_generator,
         tx_student, batch_size, latent_dim, alpha, beta, temperature, axis_name,
         bn_prior_weight=0.0):
  """One DAFL step (Chen et al. 2019): generator and student trained together.

  The generator (BatchNorm in training mode) makes a batch; it takes a step on
  L_oh + alpha L_a + beta L_ie10 (+ the BatchNorm prior) against the frozen teacher, and
  the student takes a KD step on the same images and teacher logits (no gradient to the
  generator), as in DAFL's DAFL_train.py.
  """
  z = train_steps.local_noise(jax.random.fold_in(root_key, state['step']), batch_size,
                              latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  student = student.clone(axis_name=axis_name)
  g_state, s_state = state['generator'], state['student']

  def generator_loss(params):
    images, batch_stats, logits, features, bn_prior = train_steps.generate_for_teacher(
        generator, params, g_state['batch_stats'], z, teacher, frozen['teacher'],
        bn_prior_weight, axis_name)
    total, aux = losses.dafl_generator_loss(logits, features, alpha, beta, axis_name=axis_name)
    total, aux = train_steps.with_bn_prior(total, aux, bn_prior, bn_prior_weight)
    return total, (aux, batch_stats, images, logits)

  (g_total, (aux, g_stats, images, teacher_logits)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(
          train_steps.in_compute_precision(g_state['params'], generator.dtype))
  images, teacher_logits = jax.lax.stop_gradient((images, teacher_logits))
  s_state, kd = train_steps.kd_update(s_state, images, teacher_logits, student=student,
                                      tx=tx_student, temperature=temperature,
                                      axis_name=axis_name)
  g_state = train_steps.apply_gradients(g_state, g_grads, tx_generator, axis_name, g_total,
                                        batch_stats=g_stats)
  return ({'step': state['step'] + 1, 'generator': g_state, 'student': s_state,
           'nonfinite': joint.combined_nonfinite(g_state, s_state)},
          dict(aux, total=g_total, kd=kd))


def setup(config, channels: int, generator, teacher, student):
  """DAFL's joint initial state (generator and student train states) and its step."""
  dcfg, gcfg = config.dafl, config.generator
  tx_generator = optax.adam(dcfg.generator_learning_rate)
  tx_student = optax.adam(dcfg.student_learning_rate)
  state = joint.initial_state(config, channels, generator, student, tx_generator, tx_student)
  step_fn = functools.partial(
      step, generator=generator, teacher=teacher, student=student,
      tx_generator=tx_generator, tx_student=tx_student, batch_size=dcfg.batch_size,
      latent_dim=gcfg.latent_dim, alpha=dcfg.alpha, beta=dcfg.beta,
      temperature=dcfg.temperature, bn_prior_weight=gcfg.bn_prior_weight)
  return state, step_fn


def check(config, num_devices: int) -> None:
  """config.dafl's values (every run checks them)."""
  for field in ('dafl.batch_size', 'dafl.steps'):
    config_checks.positive_int(config, field)
  for field in ('dafl.generator_learning_rate', 'dafl.student_learning_rate',
                'dafl.temperature'):
    config_checks.positive_float(config, field)
  config_checks.generated_batch(config, 'dafl', num_devices)


def train(ctx: base.Context) -> base.Outcome:
  return joint.train(ctx, NAME, setup, ctx.config.dafl.steps)


def restore(loader: base.Loader):
  return joint.restore(loader, NAME, setup)


def train_group(group: base.Group):
  return joint.train_group(group, NAME, setup, group.configs[0].dafl.steps)


def cost(config):
  """Generator and student share each step's batch."""
  samples = config.dafl.steps * config.dafl.batch_size
  return {'generator_samples': samples, 'student_samples': samples}
