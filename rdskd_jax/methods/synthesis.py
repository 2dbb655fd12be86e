"""What the methods without a generator share (DeepInversion, ZSKD): inputs optimised
against the frozen teacher into a synthesised set (the stage state's 'bank', all its
batches), on which the student trains, in one stage named after the method. A method
using it defines `setup(config, channels, num_classes, teacher, student) -> (state,
step_fn)`, `frozen(config, teacher_vars, num_classes)` and `stage_steps(config)`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax import config_checks, models, train_steps
from rdskd_jax.errors import RunStopped
from rdskd_jax.methods import base
from rdskd_jax.stages import init_key


def store_batch(bank, rows, index, axis_name):
  """The bank with every device's `rows` stored as its batch `index`, and whether they
  were finite (else the bank is unchanged: those rows stay zeros)."""
  rows = train_steps.gather_rows(rows, axis_name)
  finite = train_steps.all_finite(rows)
  stored = jax.lax.dynamic_update_slice_in_dim(bank, rows.astype(bank.dtype),
                                               index * rows.shape[0], 0)
  return jnp.where(finite, stored, bank), finite


def distil_on_bank(s_state, key, bank, filled, *, teacher, teacher_vars, student, tx_student,
                   updates, batch_size, temperature, axis_name, augment=None):
  """`updates` KD steps of the student, each on a batch drawn uniformly from the first
  `filled` rows of the bank (then `augment(key, batch)`, where given), the frozen teacher's
  logits on it as targets. Returns the student's state and the last KD loss."""
  def update(s_state, k):
    batch_key = jax.random.fold_in(key, k)
    take = jax.random.randint(batch_key, (batch_size,), 0, filled)
    batch = bank[take]
    if augment is not None:  # On the global batch, so that N devices equal one.
      batch = augment(jax.random.fold_in(batch_key, 1), batch)
    images = train_steps.global_slice(batch, axis_name)
    teacher_logits, _ = teacher.apply(teacher_vars, images, train=False)
    return train_steps.kd_update(s_state, images, teacher_logits, student=student, tx=tx_student,
                                 temperature=temperature, axis_name=axis_name)

  s_state, kd = jax.lax.scan(update, s_state, jnp.arange(updates))
  return s_state, kd[-1]


def next_state(state, bank, s_state, finite):
  """A synthesis method's next state; a batch that was not finite counts as a bad step."""
  bad, missed = s_state['nonfinite'], jnp.where(finite, 0, 1).astype(jnp.int32)
  return {'step': state['step'] + 1, 'bank': bank, 'student': s_state,
          'nonfinite': {'total': bad['total'] + missed, 'streak': bad['streak'] + missed}}


def initial_state(config, block, channels: int, teacher, student):
  """The stage's state at step 0 (an empty set of block.steps batches, the student's train
  state) and the keyword arguments of the distillation its steps share."""
  scfg = config.student
  params, collections = train_steps.classifier_init(
      student, init_key(config, 'student'), (config.image_size, config.image_size, channels))
  tx = train_steps.optimizer(scfg, scfg.steps, scfg.epoch_length)
  shape = (block.batch_size, config.image_size, config.image_size, channels)
  dtype = jnp.promote_types(jnp.float32, models.DTYPES[config.dtype])
  state = {'step': jnp.int32(0),
           'bank': jnp.zeros((block.steps * block.batch_size, *shape[1:]), dtype),
           'student': train_steps.new_train_state(params, tx, **collections),
           'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}}
  kd = dict(teacher=teacher, student=student, tx_student=tx, shape=shape,
            student_updates=scfg.steps // block.steps, student_batch_size=scfg.batch_size,
            temperature=scfg.temperature)
  return state, kd, dtype


def check(config, name: str, num_devices: int) -> None:
  """When method `name` runs, what its stage needs of its block: KD steps that divide
  among its steps, and inputs that divide among the devices."""
  if config.method != name:
    return
  block = config[name]
  config_checks.require(config.student.steps % block.steps == 0, 'student.steps',
                        config.student.steps,
                        f'a multiple of {name}.steps={block.steps} (the KD steps of each '
                        'of its steps)')
  config_checks.require(block.batch_size % num_devices == 0, f'{name}.batch_size',
                        block.batch_size, f'a multiple of the {num_devices} devices')


def train(ctx: base.Context, name: str, setup, frozen_inputs, steps: int) -> base.Outcome:
  """Method `name`'s one stage of `steps` steps: it synthesises the image set and trains
  the student on it; the diagnostics and the agreement are measured on the synthesised
  set."""
  config = ctx.config
  block, scfg = config[name], config.student
  updates = scfg.steps // block.steps
  state, step_fn = setup(config, ctx.channels, ctx.num_classes, ctx.teacher, ctx.student)
  frozen = frozen_inputs(config, ctx.teacher_vars, ctx.num_classes)
  # student.eval_every counts KD steps; the stage's steps each take `updates` of them.
  every = -(-scfg.eval_every // updates) if scfg.eval_every else 0
  state, seconds = ctx.stage(name, state, frozen, step_fn, steps,
                             lambda s: ctx.student_accuracy(s['student']), every)
  images = np.asarray(state['bank'])
  total = ctx.report.total_seconds(name, seconds)
  ctx.report.add(name, {'steps': steps, 'images': len(images), 'seconds': total})
  ctx.diagnose_images(images[:config.diagnostic_samples], steps)
  return base.Outcome(
      student_vars=train_steps.variables_of(state['student']), student_steps=scfg.steps,
      student_seconds=total, seconds=seconds, images=images,
      student_entries={'agreement_on': 'the synthesised set, which the student trained on'})


def restore(loader: base.Loader, name: str, setup):
  """(None, student variables, the images synthesised by then) of the latest checkpoint."""
  config = loader.config
  state = loader.latest(name, setup(config, loader.channels, loader.num_classes,
                                    loader.teacher, loader.student)[0])
  if state is None:
    raise RunStopped(f'{loader.workdir!r} has no {name} checkpoint yet')
  block = config[name]
  filled = min(int(state['step']), block.steps) * block.batch_size
  return (None, train_steps.variables_of(state['student']),
          np.asarray(state['bank'][:filled]))


def cost(config, name: str):
  """The images synthesised, and the KD batches' images."""
  return {'generator_samples': config[name].steps * config[name].batch_size,
          'student_samples': config.student.steps * config.student.batch_size}
