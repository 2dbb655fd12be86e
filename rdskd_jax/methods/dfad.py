"""DFAD, Data-Free Adversarial Distillation (Fang et al. 2019; the authors'
DFAD_mnist.py): generator and student trained together in one stage, the student
minimising the L1 distance of its logits to the teacher's on generated batches, the
generator maximising it. Its settings: config.dfad (rdskd_jax/methods/__init__.py).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from rdskd_jax import config_checks, losses, train_steps
from rdskd_jax.methods import base, joint

NAME = 'dfad'
STAGES = (NAME,)
BATCHNORM_PRIOR_FIELDS = ()
# curves.png: the generator's and the student's losses (plot.save_curves).
CURVES = {'generator': ('generator_l1',), 'student': ('student_l1', 'student L1 loss')}
LEARNING_RATES = {NAME: {'generator': 'dfad.generator_learning_rate',
                         'student': 'dfad.student_learning_rate'}}


def step(state, frozen, root_key, *, generator, teacher, student, tx_generator,
         tx_student, batch_size, latent_dim, student_updates, axis_name):
  """One DFAD step (Fang et al. 2019; the authors' DFAD_mnist.py): `student_updates`
  student steps, each on a fresh generated batch (no gradient to the generator),
  minimising the L1 logit discrepancy to the frozen teacher; then one generator step on
  a fresh batch, maximising it against the updated student.

  As in the authors' code, the generator and the student stay in training mode
  throughout: every generator forward uses its batch's BatchNorm statistics and updates
  the running ones, and so does the student's forward in the generator step.
  """
  key = jax.random.fold_in(root_key, state['step'])
  generator = generator.clone(axis_name=axis_name)
  student = student.clone(axis_name=axis_name)
  g_state = state['generator']
  g_params = train_steps.in_compute_precision(g_state['params'], generator.dtype)

  def generate(params, batch_stats, k):
    z = train_steps.local_noise(jax.random.fold_in(key, k), batch_size, latent_dim, axis_name)
    images, updates = generator.apply({'params': params, 'batch_stats': batch_stats}, z,
                                      train=True, mutable=['batch_stats'])
    teacher_logits, _ = teacher.apply(frozen['teacher'], images, train=False)
    return images, teacher_logits, train_steps.same_dtypes(updates['batch_stats'], batch_stats)

  def student_update(carry, k):
    g_stats, s_state = carry
    images, teacher_logits, g_stats = generate(g_params, g_stats, k)
    images, teacher_logits = jax.lax.stop_gradient((images, teacher_logits))

    def loss_fn(params):
      (student_logits, _), parts = train_steps.train_forward(student, s_state, params, images)
      return losses.logit_discrepancy(student_logits, teacher_logits,
                                      axis_name=axis_name), parts

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train_steps.in_compute_precision(s_state['params'], student.dtype))
    return (g_stats, train_steps.apply_gradients(s_state, grads, tx_student, axis_name, loss,
                                                 **parts)), loss

  (g_stats, s_state), student_losses = jax.lax.scan(
      student_update, (g_state['batch_stats'], state['student']), jnp.arange(student_updates))
  s_params = train_steps.in_compute_precision(s_state['params'], student.dtype)

  def generator_loss(params):
    images, teacher_logits, stats = generate(params, g_stats, student_updates)
    (student_logits, _), s_parts = train_steps.train_forward(student, s_state, s_params, images)
    discrepancy = losses.logit_discrepancy(student_logits, teacher_logits,
                                           axis_name=axis_name)
    return -discrepancy, (discrepancy, stats, s_parts)

  (g_loss, (discrepancy, g_stats, s_parts)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(g_params)
  g_state = train_steps.apply_gradients(g_state, g_grads, tx_generator, axis_name, g_loss,
                                        batch_stats=g_stats)
  s_state = joint.with_finite_statistics(s_state, s_parts)
  return ({'step': state['step'] + 1, 'generator': g_state, 'student': s_state,
           'nonfinite': joint.combined_nonfinite(g_state, s_state)},
          {'student_l1': student_losses[-1], 'generator_l1': discrepancy})


def setup(config, channels: int, generator, teacher, student):
  """DFAD's joint initial state (generator: Adam; student: SGD with momentum and L2, as
  the authors' DFAD_mnist.py) and its step."""
  dcfg, gcfg = config.dfad, config.generator
  tx_generator = optax.adam(dcfg.generator_learning_rate)
  tx_student = optax.sgd(dcfg.student_learning_rate, momentum=dcfg.momentum or None)
  if dcfg.weight_decay:
    tx_student = optax.chain(optax.add_decayed_weights(dcfg.weight_decay), tx_student)
  state = joint.initial_state(config, channels, generator, student, tx_generator, tx_student)
  step_fn = functools.partial(
      step, generator=generator, teacher=teacher, student=student,
      tx_generator=tx_generator, tx_student=tx_student, batch_size=dcfg.batch_size,
      latent_dim=gcfg.latent_dim, student_updates=dcfg.student_updates)
  return state, step_fn


def check(config, num_devices: int) -> None:
  """config.dfad's values (every run checks them); when it runs, no BatchNorm prior, which
  its generator loss does not take."""
  for field in ('dfad.batch_size', 'dfad.steps', 'dfad.student_updates'):
    config_checks.positive_int(config, field)
  for field in ('dfad.generator_learning_rate', 'dfad.student_learning_rate'):
    config_checks.positive_float(config, field)
  for field in ('dfad.momentum', 'dfad.weight_decay'):
    config_checks.non_negative(config, field)
  config_checks.require(config.method != NAME or config.generator.bn_prior_weight == 0,
                        'generator.bn_prior_weight', config.generator.bn_prior_weight,
                        f"0 with method {NAME!r} (its generator loss is the discrepancy alone)")
  config_checks.generated_batch(config, 'dfad', num_devices)


def train(ctx: base.Context) -> base.Outcome:
  return joint.train(ctx, NAME, setup, ctx.config.dfad.steps)


def restore(loader: base.Loader):
  return joint.restore(loader, NAME, setup)


def train_group(group: base.Group):
  return joint.train_group(group, NAME, setup, group.configs[0].dfad.steps)


def cost(config):
  """Each step: student_updates student batches, then one generator batch."""
  generator = config.dfad.steps * config.dfad.batch_size
  return {'generator_samples': generator,
          'student_samples': generator * config.dfad.student_updates}
