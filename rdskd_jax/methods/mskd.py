"""MSKD: zero-shot knowledge transfer by adversarial belief matching (Micaelli and
Storkey, NeurIPS 2019, arXiv 1905.09768; the RDSKD paper names it by its authors'
initials). An adversarial generator seeks images on which the student's beliefs differ
from the teacher's, measured by their KL divergence; the student minimises that
divergence plus an attention-transfer term on intermediate feature maps. Generator and
student train together in one stage (`methods/joint.py`). Its settings: config.mskd
(rdskd_jax/methods/__init__.py), whose defaults are the authors' for CIFAR-10.

Choices, each from the authors' polo5/ZeroShotKnowledgeTransfer (solver.py, main.py,
utils/loaders.py, scripts/ZeroShot):
- The KL is PyTorch's `F.kl_div(log_softmax(s/T), softmax(t/T))` at its default
  reduction: the mean over the batch *and the classes* of p_t (log p_t - log p_s), that
  is KL(teacher || student) / C per sample. beta = 250 is on that scale.
- Attention (Zagoruyko and Komodakis's attention transfer, as the authors take it): a
  feature map's mean over channels of its squares, flattened and L2-normalised per
  sample; the term is, summed over the maps, the mean over the batch and positions of
  the squared difference of the student's and the teacher's. The maps are the outputs of
  each residual group (WRN) or stage (ResNet); LeNet-5 has neither, and gives the outputs
  of its two pooled convolutions, 14x14 and 5x5, the same sizes in LeNet-5 and
  LeNet-5-half (models.mark_attention).
- One noise batch per iteration, shared by its steps: mskd.generator_updates generator
  steps on it, then mskd.student_updates student steps on the images of the updated
  generator, the teacher's outputs on them computed once.
- The generator and the student stay in training mode (BatchNorm on batch statistics);
  the student's forward in the generator step updates its running statistics, as the
  authors' `student.train()` does. Their loop runs the generator forward again for each
  student step of an iteration, refreshing its running statistics with the same batch's;
  here once per iteration.
- Both networks: Adam, the global gradient norm clipped at 5, the learning rate
  cosine-annealed to 0 over the iterations (CosineAnnealingLR stepped once an iteration).
- The generator is this package's (DAFL's, `models.Generator`), as for DAFL and DFAD, not
  the authors' (a linear layer to 128 x 10 x 10, upsampling by 1.6 and 2).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from rdskd_jax import config_checks, losses, models, train_steps
from rdskd_jax.errors import ConfigError
from rdskd_jax.methods import base, joint

NAME = 'mskd'
STAGES = (NAME,)
BATCHNORM_PRIOR_FIELDS = ()
# curves.png: the generator's and the student's losses (plot.save_curves).
CURVES = {'generator': ('generator_kl',),
          'student': ('student_total', 'student loss: KL + beta x attention')}
LEARNING_RATES = {NAME: {'generator': 'mskd.generator_learning_rate',
                         'student': 'mskd.student_learning_rate'}}


# ----------------------------------------------------------------------------- losses

def belief_divergence(student_logits, teacher_logits, temperature, *, axis_name=None):
  """KL(softmax(t/T) || softmax(s/T)) averaged over the batch and the classes, as the
  authors' `F.kl_div` (mean reduction): 1/(N C) sum_n sum_c p_nc (log p_nc - log q_nc).
  Gradient flows to both sides; the caller stops what it does not train."""
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  per_sample = jnp.mean(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return losses.global_mean(per_sample, axis_name)


def attention_map(feature_map):
  """A feature map's spatial attention: the mean over channels of its squares, flattened
  and divided by its L2 norm per sample (PyTorch's F.normalize, eps 1e-12): (N, H W)."""
  x = feature_map.astype(jnp.float32)
  a = jnp.mean(jnp.square(x), axis=-1).reshape(x.shape[0], -1)
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def attention_transfer(student_maps, teacher_maps, *, axis_name=None):
  """Sum over the paired maps of the mean over the batch and positions of
  (attention_map(s) - attention_map(t))^2."""
  total = jnp.zeros((), jnp.float32)
  for s, t in zip(student_maps, teacher_maps):
    per_sample = jnp.mean(jnp.square(attention_map(s) - attention_map(t)), axis=-1)
    total = total + losses.global_mean(per_sample, axis_name)
  return total


# ------------------------------------------------------------------------------ steps

def _student_forward(student, s_state, params, images):
  """The student in training mode: (logits, attention maps, updated statistics)."""
  variables = {'params': params, **({'batch_stats': s_state['batch_stats']}
                                    if 'batch_stats' in s_state else {})}
  (logits, _), maps, updates = models.with_attention(student, variables, images, train=True)
  return logits, maps, updates


def step(state, frozen, root_key, *, generator, teacher, student, tx_generator, tx_student,
         batch_size, latent_dim, generator_updates, student_updates, beta, temperature,
         axis_name):
  """One iteration: `generator_updates` generator steps maximising the belief divergence
  on one noise batch, then `student_updates` student steps on the updated generator's
  images minimising the divergence plus beta times the attention-transfer term."""
  z = train_steps.local_noise(jax.random.fold_in(root_key, state['step']), batch_size,
                              latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  student = student.clone(axis_name=axis_name)

  def generate(g_state):
    images, updates = generator.apply(
        {'params': train_steps.in_compute_precision(g_state['params'], generator.dtype),
         'batch_stats': g_state['batch_stats']}, z, train=True, mutable=['batch_stats'])
    return images, updates['batch_stats']

  def generator_update(carry, _):
    g_state, s_state = carry
    s_params = train_steps.in_compute_precision(s_state['params'], student.dtype)

    def loss_fn(params):
      images, stats = generate(dict(g_state, params=params))
      teacher_logits, _ = teacher.apply(frozen['teacher'], images, train=False)
      student_logits, _, s_parts = _student_forward(student, s_state, s_params, images)
      divergence = belief_divergence(student_logits, teacher_logits, temperature,
                                     axis_name=axis_name)
      return -divergence, (divergence, stats, s_parts)

    (loss, (divergence, stats, s_parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train_steps.in_compute_precision(g_state['params'], generator.dtype))
    g_state = train_steps.apply_gradients(g_state, grads, tx_generator, axis_name, loss,
                                          batch_stats=stats)
    s_state = joint.with_finite_statistics(s_state, s_parts)
    return (g_state, s_state), divergence

  (g_state, s_state), divergences = jax.lax.scan(
      generator_update, (state['generator'], state['student']), jnp.arange(generator_updates))
  images, stats = generate(g_state)
  g_state = dict(g_state, batch_stats=train_steps.same_dtypes(stats, g_state['batch_stats']))
  images = jax.lax.stop_gradient(images)
  (teacher_logits, _), teacher_maps, _ = models.with_attention(teacher, frozen['teacher'],
                                                               images)

  def student_update(s_state, _):
    def loss_fn(params):
      student_logits, maps, s_parts = _student_forward(student, s_state, params, images)
      divergence = belief_divergence(student_logits, teacher_logits, temperature,
                                     axis_name=axis_name)
      attention = (attention_transfer(maps, teacher_maps, axis_name=axis_name) if beta > 0
                   else jnp.zeros((), jnp.float32))
      return divergence + beta * attention, (divergence, attention, s_parts)

    (total, (divergence, attention, s_parts)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(train_steps.in_compute_precision(s_state['params'],
                                                                student.dtype))
    s_state = train_steps.apply_gradients(s_state, grads, tx_student, axis_name, total,
                                          **s_parts)
    return s_state, {'student_kl': divergence, 'attention': attention, 'student_total': total}

  s_state, parts = jax.lax.scan(student_update, s_state, jnp.arange(student_updates))
  return ({'step': state['step'] + 1, 'generator': g_state, 'student': s_state,
           'nonfinite': joint.combined_nonfinite(g_state, s_state)},
          dict(jax.tree.map(lambda m: m[-1], parts), generator_kl=divergences[-1]))


# ---------------------------------------------------------------------- stage set-up

def _optimizer(learning_rate, clip_norm, iterations, updates_per_iteration):
  """Adam on the global gradient norm clipped at `clip_norm` (0: none), its learning rate
  cosine-annealed to 0 over `iterations`, constant within an iteration's updates."""
  cosine = optax.cosine_decay_schedule(learning_rate, iterations)
  adam = optax.adam(lambda count: cosine(count // updates_per_iteration))
  return optax.chain(optax.clip_by_global_norm(clip_norm), adam) if clip_norm else adam


def setup(config, channels: int, generator, teacher, student):
  """The stage's initial state (generator and student train states) and its step."""
  mcfg = config.mskd
  tx_generator = _optimizer(mcfg.generator_learning_rate, mcfg.clip_norm, mcfg.steps,
                            mcfg.generator_updates)
  tx_student = _optimizer(mcfg.student_learning_rate, mcfg.clip_norm, mcfg.steps,
                          mcfg.student_updates)
  state = joint.initial_state(config, channels, generator, student, tx_generator, tx_student)
  step_fn = functools.partial(
      step, generator=generator, teacher=teacher, student=student,
      tx_generator=tx_generator, tx_student=tx_student, batch_size=mcfg.batch_size,
      latent_dim=config.generator.latent_dim, generator_updates=mcfg.generator_updates,
      student_updates=mcfg.student_updates, beta=mcfg.beta, temperature=mcfg.temperature)
  return state, step_fn


def check(config, num_devices: int) -> None:
  """config.mskd's values (every run checks them)."""
  for field in ('mskd.batch_size', 'mskd.steps', 'mskd.generator_updates',
                'mskd.student_updates'):
    config_checks.positive_int(config, field)
  for field in ('mskd.generator_learning_rate', 'mskd.student_learning_rate',
                'mskd.temperature'):
    config_checks.positive_float(config, field)
  for field in ('mskd.beta', 'mskd.clip_norm'):
    config_checks.non_negative(config, field)
  config_checks.generated_batch(config, NAME, num_devices)


def check_attention(config, teacher, teacher_vars, student, channels: int) -> None:
  """A ConfigError when the attention term (mskd.beta > 0) cannot pair the teacher's
  feature maps with the student's: a teacher that marks none (a module from outside), or
  maps of other counts or sizes."""
  if config.mskd.beta == 0:
    return
  images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, channels),
                                jnp.float32)
  student_vars = jax.eval_shape(student.init, jax.random.key(0), images)

  def sizes(model, variables):
    maps = jax.eval_shape(lambda v, x: models.with_attention(model, v, x)[1], variables,
                          images)
    return [m.shape[1:3] for m in maps]

  theirs, ours = sizes(teacher, teacher_vars), sizes(student, student_vars)
  if not theirs or theirs != ours:
    raise ConfigError(
        f'config.mskd.beta={config.mskd.beta}: expected 0 for this teacher, whose feature '
        f'maps ({theirs or "none marked"}) do not pair with the student\'s ({ours}) for '
        'attention transfer (models.mark_attention)')


# --------------------------------------------------------------------------- training

def train(ctx: base.Context) -> base.Outcome:
  check_attention(ctx.config, ctx.teacher, ctx.teacher_vars, ctx.student, ctx.channels)
  return joint.train(ctx, NAME, setup, ctx.config.mskd.steps)


def restore(loader: base.Loader):
  return joint.restore(loader, NAME, setup)


def train_group(group: base.Group):
  return joint.train_group(group, NAME, setup, group.configs[0].mskd.steps)


def cost(config):
  """Each iteration: its generator steps and its student steps, all on one batch."""
  mcfg = config.mskd
  return {'generator_samples': mcfg.steps * mcfg.batch_size * mcfg.generator_updates,
          'student_samples': mcfg.steps * mcfg.batch_size * mcfg.student_updates}
