"""The student's sample bank (`student.reuse` > 1): generated images with the frozen
teacher's logits stored beside them, so that each image of the frozen generator serves
`reuse` student batches on average (docs/2026-12-04-sample-bank.md).

The bank is a ring of blocks of batch/reuse images; it is a function of (seed, step) and
its shapes, so checkpoints leave it out and a resumed stage rebuilds it (`rebuild_bank`,
the runner's `derived` entries).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax import models, train_steps

def labelled_samples(key, count, frozen, *, generator, teacher, latent_dim, axis_name):
  """This device's rows of `count` fresh samples of the frozen generator in inference mode
  (each sample independent of the others), drawn from `key` alike on every device, and
  the frozen teacher's logits on them."""
  z = train_steps.global_slice(jax.random.normal(key, (count, latent_dim)), axis_name)
  images = generator.apply(frozen['generator'], z, train=False)
  logits, _ = teacher.apply(frozen['teacher'], images, train=False)
  return images, logits


def _fresh_key(root_key, step):
  """The key of a step's fresh bank images (a traced step; negative: the virtual steps
  whose images fill the bank before step 0)."""
  return jax.random.fold_in(jax.random.fold_in(root_key, step), 0)


def rebuild_bank(state, frozen, root_key, *, generator, teacher, latent_dim, fresh, axis_name):
  """The student's state with its bank (`state['bank']`: images and the teacher's
  logits) as it stands before step `state['step']`: block k of the ring holds the fresh
  images of the last step s < step with s = k (mod blocks), the steps before 0 virtual
  ones with keys of their own. So the bank is a function of (seed, step) and the shapes:
  checkpoints leave it out, and a resumed stage makes it again. Each device makes its
  share of every block; every device keeps the whole bank."""
  bank = state['bank']
  blocks = bank['images'].shape[0] // fresh
  step = jnp.asarray(state['step'], jnp.int32)

  def block(k):
    source = k + blocks * jnp.floor_divide(step - 1 - k, blocks)
    new = labelled_samples(_fresh_key(root_key, source), fresh, frozen, generator=generator,
                           teacher=teacher, latent_dim=latent_dim, axis_name=axis_name)
    return tuple(train_steps.gather_rows(x, axis_name) for x in new)

  images, logits = jax.lax.map(block, jnp.arange(blocks, dtype=jnp.int32))
  rebuilt = {'images': images.reshape(bank['images'].shape),
             'logits': logits.reshape(bank['logits'].shape)}
  return dict(state, bank=train_steps.same_dtypes(rebuilt, bank)), {}


def bank_student_step(state, frozen, root_key, *, generator, teacher, student, tx, batch_size,
                      reuse, latent_dim, temperature, axis_name):
  """One KD step of the student on a batch of which 1/`reuse` is fresh samples of the
  frozen generator and the rest is drawn from the bank of earlier ones, the teacher's
  logits on each stored beside it when it was made (both networks are frozen and in
  inference mode, so they are the logits a fresh pass would give).

  The bank is a ring of blocks of batch_size/reuse images: the step's fresh block
  replaces the oldest after the step, so an image stays for bank/fresh steps and is drawn
  reuse - 1 times on average besides its fresh use (`rebuild_bank` says what it holds at
  a step). The draw is of global rows from a key of the step, each device taking its rows
  of the global batch, so it does not depend on the number of devices; the fresh images
  divide among the devices.
  """
  key = jax.random.fold_in(root_key, state['step'])
  fresh = batch_size // reuse
  bank = state['bank']
  size = bank['images'].shape[0]
  images, logits = labelled_samples(_fresh_key(root_key, state['step']), fresh, frozen,
                                    generator=generator, teacher=teacher,
                                    latent_dim=latent_dim, axis_name=axis_name)
  new = train_steps.same_dtypes({'images': images, 'logits': logits}, bank)
  take = train_steps.global_slice(
      jax.random.randint(jax.random.fold_in(key, 1), (batch_size - fresh,), 0, size), axis_name)
  batch = jax.tree.map(lambda n, b: jnp.concatenate([n, b[take]]), new, bank)
  s_state = {k: v for k, v in state.items() if k != 'bank'}
  s_state, loss = train_steps.kd_update(
      s_state, batch['images'], batch['logits'], student=student.clone(axis_name=axis_name),
      tx=tx, temperature=temperature, axis_name=axis_name)
  slot = (state['step'] % (size // fresh)) * fresh
  bank = jax.tree.map(lambda b, n: jax.lax.dynamic_update_slice_in_dim(
      b, train_steps.gather_rows(n, axis_name), slot, 0), bank, new)
  return dict(s_state, bank=bank), {'kd': loss}


def bank_size(config) -> int:
  """Images in the student's bank: config.student.bank_size, 0: 16 batches; none when
  student.reuse is 1 (every step's batch fresh)."""
  scfg = config.student
  if scfg.reuse == 1:
    return 0
  return scfg.bank_size or 16 * scfg.batch_size


def empty_bank(config, channels: int, num_classes: int):
  """The bank's arrays before the runner builds them: images and the teacher's logits,
  in float32 (the networks' outputs are float32 under bfloat16 compute too)."""
  size = bank_size(config)
  dtype = jnp.promote_types(jnp.float32, models.DTYPES[config.dtype])
  return {'images': jnp.zeros((size, config.image_size, config.image_size, channels), dtype),
          'logits': jnp.zeros((size, num_classes), dtype)}


def derived(config, generator, teacher):
  """What the student stage's runner rebuilds rather than checkpoints: (('bank',), the
  per-device `rebuild_bank`), or None without a bank."""
  if config.student.reuse == 1:
    return None
  return ('bank',), functools.partial(
      rebuild_bank, generator=generator, teacher=teacher,
      latent_dim=config.generator.latent_dim,
      fresh=config.student.batch_size // config.student.reuse)


def report(config, state):
  """What report.json says of the student's samples: their reuse, and the bank's images
  and bytes (images and the teacher's logits; every device holds the whole bank)."""
  bank = state.get('bank')
  return {'reuse': config.student.reuse, 'bank_size': bank_size(config),
          'bank_bytes': 0 if bank is None else int(sum(np.asarray(x).nbytes
                                                       for x in jax.tree.leaves(bank)))}
