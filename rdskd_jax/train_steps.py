"""The pure per-device train steps, and the gradient application they share.

Each step is written once, for one device, as
    step(state, frozen, root_key, *batch, axis_name) -> (state, metrics)
with every batch reduction a collective over `axis_name` (None: no collectives);
`parallel.py` turns it into a data-parallel (or run-batched) program. The state is a plain
pytree: step, params, opt_state, skipped-step counters and the entries a network updates
besides its parameters (BatchNorm statistics, loss references).
"""

import functools

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from rdskd_jax import losses, models


def local_noise(key, batch_size, latent_dim, axis_name):
  """This device's slice of the global noise batch, drawn as on one device.

  The global batch is [first half; second half] and L_ds pairs sample i with i + B/2, so
  device d takes the d-th slice of each half: its local halves are pairs of the global ones.
  """
  z = jax.random.normal(key, (batch_size, latent_dim))
  if axis_name is None:
    return z
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  half, per = batch_size // 2, batch_size // 2 // n
  first = jax.lax.dynamic_slice_in_dim(z[:half], i * per, per)
  second = jax.lax.dynamic_slice_in_dim(z[half:], i * per, per)
  return jnp.concatenate([first, second])


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _in_compute_precision(params, dtype):
  """Parameters promoted to the compute dtype where it is wider (float32 parameters under
  float64 compute), for differentiating: the gradients then keep the compute precision
  until they are averaged over devices. Otherwise (float32, bfloat16) the same arrays."""
  if dtype is None:
    return params
  return jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, dtype)), params)


def apply_gradients(state, grads, tx, axis_name, loss, **new_parts):
  """One Adam step, with `new_parts` (BatchNorm statistics, loss references) replacing
  their state entries; skipped when the loss, any gradient or any updated entry is not
  finite (an infinite learning rate turns finite gradients into infinite parameters).

  A state with an `lr_scale` entry (a vmapped sweep, where runs differ in learning rate)
  has a `tx` built with learning rate 1: updates of Adam and SGD are linear in it, and the
  run's rate multiplies them here.

  A skipped step keeps the whole state but advances the step (its keys and noise are
  spent) and counts itself in `nonfinite`: `total` skipped steps and the current
  `streak` of consecutive ones, which the stage runner checks when it logs. Gradients are
  averaged over devices first, so every device takes the same decision, without a host
  round trip.
  """
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  # Rounded to the parameters' dtype only after the average (see _in_compute_precision).
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  if 'lr_scale' in state:  # Sweeps: `tx` has learning rate 1, the state holds the run's.
    updates = jax.tree.map(lambda u: u * state['lr_scale'].astype(u.dtype), updates)
  updated = dict(state, params=optax.apply_updates(state['params'], updates),
                 opt_state=opt_state, **new_parts)
  finite = (jnp.isfinite(loss) & _all_finite(grads)
            & _all_finite((updated['params'], new_parts)))
  # Every entry keeps its dtype (statistics computed in float64 are stored in float32,
  # as the parameters are), so that the state is one type from step to step (a scan).
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old).astype(old.dtype),
                      updated, state)
  bad = state['nonfinite']
  return dict(kept, step=state['step'] + 1, nonfinite={
      'total': bad['total'] + jnp.where(finite, 0, 1).astype(jnp.int32),
      'streak': jnp.where(finite, 0, bad['streak'] + 1).astype(jnp.int32)})


def new_train_state(params, tx, **extra):
  """A stage's train state at step 0: parameters, optimizer state, the skipped-step
  counters, and `extra` entries (BatchNorm statistics, loss references)."""
  return {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params),
          'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}, **extra}


def init_variables(module, key, example):
  """A module's initial variables, computed as one compiled program: run op by op, an
  initialisation compiles each of its many small operations separately, which takes longer
  (the same bits either way)."""
  return jax.jit(module.init)(key, example)


def classifier_init(model, key, image_shape):
  """(params, other variable collections) of a classifier, e.g. BatchNorm statistics."""
  variables = init_variables(model, key, jnp.zeros((1, *image_shape)))
  return variables['params'], {k: v for k, v in variables.items() if k != 'params'}


def variables_of(state):
  """The variables a classifier's train state stands for (params and, where it has
  BatchNorm, its running statistics)."""
  return {'params': state['params'],
          **({'batch_stats': state['batch_stats']} if 'batch_stats' in state else {})}


def train_forward(model, state, params, images):
  """A classifier in training mode: ((logits, features), state entries it updates)."""
  if 'batch_stats' not in state:
    return model.apply({'params': params}, images, train=True), {}
  out, updates = model.apply({'params': params, 'batch_stats': state['batch_stats']}, images,
                             train=True, mutable=['batch_stats'])
  return out, {'batch_stats': updates['batch_stats']}


def teacher_step(state, frozen, root_key, images, labels, *, model, tx, axis_name):
  """One optimizer step of the teacher on a real batch (cross-entropy)."""
  del frozen, root_key  # Batch order and augmentation are drawn on the host.
  model = model.clone(axis_name=axis_name)

  def loss_fn(params):
    (logits, _), new_parts = train_forward(model, state, params, images)
    loss = losses.cross_entropy_loss(logits, labels, axis_name=axis_name)
    return loss, (logits, new_parts)

  (loss, (logits, new_parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _in_compute_precision(state['params'], model.dtype))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  if axis_name is not None:
    accuracy = jax.lax.pmean(accuracy, axis_name)
  return (apply_gradients(state, grads, tx, axis_name, loss, **new_parts),
          {'loss': loss, 'train_accuracy': accuracy})


def teacher_forward(teacher, variables, images, *, bn_prior: bool = False, axis_name=None):
  """The frozen teacher in inference mode: (logits, features, BatchNorm prior).

  With `bn_prior`, each BatchNorm layer's input statistics on `images` (over the global
  batch under data parallelism) are compared with its running statistics
  (`losses.bn_statistics_loss`); otherwise the prior is 0.
  """
  if not bn_prior:
    logits, features = teacher.apply(variables, images, train=False)
    return logits, features, jnp.zeros((), jnp.float32)
  mean_of = lambda x: losses.global_mean(x, axis_name)
  captured = []

  def record_batchnorm_inputs(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      x = args[0].astype(jnp.float32)
      flat = x.reshape(-1, x.shape[-1])
      mean = mean_of(flat)
      var = mean_of(jnp.square(flat - mean))  # Two-pass, biased: BatchNorm's variance.
      stats = context.module.variables['batch_stats']
      captured.append((mean, var, stats['mean'], stats['var']))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_batchnorm_inputs):
    logits, features = teacher.apply(variables, images, train=False)
  return logits, features, losses.bn_statistics_loss(*zip(*captured))


def _generate_for_teacher(generator, params, batch_stats, z, teacher, teacher_vars,
                          bn_prior_weight, axis_name):
  """What a generator loss sees: the images of the generator in training mode (BatchNorm
  on the batch) and its new statistics, and the frozen teacher's logits, features and
  BatchNorm prior on them (the prior computed only when it is weighted)."""
  images, updates = generator.apply({'params': params, 'batch_stats': batch_stats}, z,
                                    train=True, mutable=['batch_stats'])
  logits, features, bn_prior = teacher_forward(
      teacher, teacher_vars, images, bn_prior=bn_prior_weight > 0, axis_name=axis_name)
  return images, updates['batch_stats'], logits, features, bn_prior


def _with_bn_prior(total, aux, bn_prior, bn_prior_weight):
  """A generator loss and its parts with the weighted BatchNorm prior added, if any."""
  if bn_prior_weight > 0:
    return total + bn_prior_weight * bn_prior, dict(aux, bn_prior=bn_prior)
  return total, aux


def generator_step(state, frozen, root_key, *, generator, teacher, tx, batch_size,
                   latent_dim, epoch_length, axis_name, bn_prior_weight=0.0):
  """One RDSKD generator step (teacher frozen in inference mode).

  The loss references refresh, after this step's loss is computed, when the step is at
  index 1 of its epoch, as in the authors' code.
  """
  z = local_noise(jax.random.fold_in(root_key, state['step']), batch_size, latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  ref_one_hot, ref_entropy = state['loss_refs'][0], state['loss_refs'][1]

  def loss_fn(params):
    images, batch_stats, teacher_logits, _, bn_prior = _generate_for_teacher(
        generator, params, state['batch_stats'], z, teacher, frozen['teacher'],
        bn_prior_weight, axis_name)
    total, aux = losses.rdskd_generator_loss(images, teacher_logits, ref_one_hot,
                                             ref_entropy, axis_name=axis_name)
    total, aux = _with_bn_prior(total, aux, bn_prior, bn_prior_weight)
    return total, (aux, batch_stats)

  (total, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _in_compute_precision(state['params'], generator.dtype))
  refresh = state['step'] % epoch_length == 1
  new_refs = jnp.where(refresh, jnp.stack([aux['one_hot'], aux['information_entropy']]),
                       state['loss_refs']).astype(state['loss_refs'].dtype)
  state = apply_gradients(state, grads, tx, axis_name, total, batch_stats=batch_stats,
                           loss_refs=new_refs)
  return state, dict(aux, total=total)


def kd_update(state, images, teacher_logits, *, student, tx, temperature, axis_name):
  """One KD step of the student's train state on `images`, the teacher's logits on them
  as targets (losses.kd_loss at `temperature`): the step of every method's student but
  DFAD's. Returns the new state and the loss."""
  def loss_fn(params):
    (student_logits, _), new_parts = train_forward(student, state, params, images)
    return losses.kd_loss(student_logits, teacher_logits, temperature,
                          axis_name=axis_name), new_parts

  (loss, new_parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _in_compute_precision(state['params'], student.dtype))
  return apply_gradients(state, grads, tx, axis_name, loss, **new_parts), loss


def student_step(state, frozen, root_key, *, generator, teacher, student, tx, batch_size,
                 latent_dim, temperature, axis_name, generator_batchnorm='running'):
  """One KD step of the student on fresh samples of the frozen generator (its BatchNorm
  in `generator_batchnorm` mode, models.generate)."""
  z = local_noise(jax.random.fold_in(root_key, state['step']), batch_size, latent_dim, axis_name)
  images = models.generate(generator, frozen['generator'], z, generator_batchnorm, axis_name)
  teacher_logits, _ = teacher.apply(frozen['teacher'], images, train=False)
  state, loss = kd_update(state, images, teacher_logits, student=student.clone(
      axis_name=axis_name), tx=tx, temperature=temperature, axis_name=axis_name)
  return state, {'kd': loss}


def labelled_samples(key, count, frozen, *, generator, teacher, latent_dim, axis_name):
  """This device's rows of `count` fresh samples of the frozen generator in inference mode
  (each sample independent of the others), drawn from `key` alike on every device, and
  the frozen teacher's logits on them."""
  z = _global_slice(jax.random.normal(key, (count, latent_dim)), axis_name)
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
    return tuple(_gather_rows(x, axis_name) for x in new)

  images, logits = jax.lax.map(block, jnp.arange(blocks, dtype=jnp.int32))
  rebuilt = {'images': images.reshape(bank['images'].shape),
             'logits': logits.reshape(bank['logits'].shape)}
  return dict(state, bank=_same_dtypes(rebuilt, bank)), {}


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
  new = _same_dtypes({'images': images, 'logits': logits}, bank)
  take = _global_slice(jax.random.randint(jax.random.fold_in(key, 1), (batch_size - fresh,),
                                          0, size), axis_name)
  batch = jax.tree.map(lambda n, b: jnp.concatenate([n, b[take]]), new, bank)
  s_state = {k: v for k, v in state.items() if k != 'bank'}
  s_state, loss = kd_update(s_state, batch['images'], batch['logits'], student=student.clone(
      axis_name=axis_name), tx=tx, temperature=temperature, axis_name=axis_name)
  slot = (state['step'] % (size // fresh)) * fresh
  bank = jax.tree.map(lambda b, n: jax.lax.dynamic_update_slice_in_dim(
      b, _gather_rows(n, axis_name), slot, 0), bank, new)
  return dict(s_state, bank=bank), {'kd': loss}


def dafl_step(state, frozen, root_key, *, generator, teacher, student, tx_generator,
              tx_student, batch_size, latent_dim, alpha, beta, temperature, axis_name,
              bn_prior_weight=0.0):
  """One DAFL step (Chen et al. 2019): generator and student trained together.

  The generator (BatchNorm in training mode) makes a batch; it takes a step on
  L_oh + alpha L_a + beta L_ie10 (+ the BatchNorm prior) against the frozen teacher, and
  the student takes a KD step on the same images and teacher logits (no gradient to the
  generator), as in DAFL's DAFL_train.py.
  """
  z = local_noise(jax.random.fold_in(root_key, state['step']), batch_size, latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  student = student.clone(axis_name=axis_name)
  g_state, s_state = state['generator'], state['student']

  def generator_loss(params):
    images, batch_stats, logits, features, bn_prior = _generate_for_teacher(
        generator, params, g_state['batch_stats'], z, teacher, frozen['teacher'],
        bn_prior_weight, axis_name)
    total, aux = losses.dafl_generator_loss(logits, features, alpha, beta, axis_name=axis_name)
    total, aux = _with_bn_prior(total, aux, bn_prior, bn_prior_weight)
    return total, (aux, batch_stats, images, logits)

  (g_total, (aux, g_stats, images, teacher_logits)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(_in_compute_precision(g_state['params'], generator.dtype))
  images, teacher_logits = jax.lax.stop_gradient((images, teacher_logits))
  s_state, kd = kd_update(s_state, images, teacher_logits, student=student, tx=tx_student,
                          temperature=temperature, axis_name=axis_name)
  g_state = apply_gradients(g_state, g_grads, tx_generator, axis_name, g_total,
                             batch_stats=g_stats)
  bad_g, bad_s = g_state['nonfinite'], s_state['nonfinite']
  return ({'step': state['step'] + 1, 'generator': g_state, 'student': s_state,
           'nonfinite': {'total': bad_g['total'] + bad_s['total'],
                         'streak': jnp.maximum(bad_g['streak'], bad_s['streak'])}},
          dict(aux, total=g_total, kd=kd))


def _same_dtypes(new, old):
  """`new` cast to the dtypes of `old` (a scan carries one type from step to step)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def dfad_step(state, frozen, root_key, *, generator, teacher, student, tx_generator,
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
  g_params = _in_compute_precision(g_state['params'], generator.dtype)

  def generate(params, batch_stats, k):
    z = local_noise(jax.random.fold_in(key, k), batch_size, latent_dim, axis_name)
    images, updates = generator.apply({'params': params, 'batch_stats': batch_stats}, z,
                                      train=True, mutable=['batch_stats'])
    teacher_logits, _ = teacher.apply(frozen['teacher'], images, train=False)
    return images, teacher_logits, _same_dtypes(updates['batch_stats'], batch_stats)

  def student_update(carry, k):
    g_stats, s_state = carry
    images, teacher_logits, g_stats = generate(g_params, g_stats, k)
    images, teacher_logits = jax.lax.stop_gradient((images, teacher_logits))

    def loss_fn(params):
      (student_logits, _), parts = train_forward(student, s_state, params, images)
      return losses.logit_discrepancy(student_logits, teacher_logits,
                                      axis_name=axis_name), parts

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        _in_compute_precision(s_state['params'], student.dtype))
    return (g_stats, apply_gradients(s_state, grads, tx_student, axis_name, loss,
                                     **parts)), loss

  (g_stats, s_state), student_losses = jax.lax.scan(
      student_update, (g_state['batch_stats'], state['student']), jnp.arange(student_updates))
  s_params = _in_compute_precision(s_state['params'], student.dtype)

  def generator_loss(params):
    images, teacher_logits, stats = generate(params, g_stats, student_updates)
    (student_logits, _), s_parts = train_forward(student, s_state, s_params, images)
    discrepancy = losses.logit_discrepancy(student_logits, teacher_logits,
                                           axis_name=axis_name)
    return -discrepancy, (discrepancy, stats, s_parts)

  (g_loss, (discrepancy, g_stats, s_parts)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(g_params)
  g_state = apply_gradients(g_state, g_grads, tx_generator, axis_name, g_loss,
                            batch_stats=g_stats)
  if s_parts:  # The student's running statistics of the generator step, where finite.
    s_parts = _same_dtypes(s_parts, {k: s_state[k] for k in s_parts})
    finite = _all_finite(s_parts)
    s_state = dict(s_state, **jax.tree.map(lambda n, o: jnp.where(finite, n, o), s_parts,
                                           {k: s_state[k] for k in s_parts}))
  bad_g, bad_s = g_state['nonfinite'], s_state['nonfinite']
  return ({'step': state['step'] + 1, 'generator': g_state, 'student': s_state,
           'nonfinite': {'total': bad_g['total'] + bad_s['total'],
                         'streak': jnp.maximum(bad_g['streak'], bad_s['streak'])}},
          {'student_l1': student_losses[-1], 'generator_l1': discrepancy})


def _global_slice(x, axis_name):
  """This device's rows of a global batch `x` drawn alike on every device."""
  if axis_name is None:
    return x
  per = x.shape[0] // jax.lax.axis_size(axis_name)
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * per, per)


def _gather_rows(local, axis_name):
  """The global batch of every device's rows `local`, the same on every device. A psum of
  zero-padded shares (exact: each row is added to zeros) rather than all_gather, whose
  result shard_map does not take as replicated."""
  if axis_name is None:
    return local
  n, i = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  placed = jnp.zeros((local.shape[0] * n, *local.shape[1:]), local.dtype)
  return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(placed, local, i * local.shape[0], 0),
                      axis_name)


def _differentiated_once(loss_fn, axis_name):
  """`loss_fn` (a global loss, the same on every device; (loss, aux)) as the objective
  whose gradient with respect to each device's own inputs is its rows of the one-device
  gradient. pmap and shard_map both differentiate the sum over devices of each device's
  output, and with plain collectives the replicated loss counts once per device under
  pmap (N times the gradient) and once under shard_map; counted on device 0 alone, it
  is once under both. Not for replicated parameters: their gradients are averaged over
  devices (apply_gradients).
  """
  if axis_name is None:
    return loss_fn

  def once(*args):
    loss, aux = loss_fn(*args)
    return jnp.where(jax.lax.axis_index(axis_name) == 0, loss, 0.0), aux
  return once


def optimise_inputs(inputs, loss_fn, *, iterations, learning_rate, axis_name):
  """`iterations` Adam steps on `inputs` (this device's rows of a global batch) of
  `loss_fn(inputs, iteration) -> (global loss, metrics)`, the networks frozen. Returns
  the inputs at the iteration of the lowest loss (before that iteration's update, as
  DeepInversion's authors keep them; a non-finite loss is never kept) and the metrics
  of the last iteration, with the lowest loss as `best_total`."""
  tx = optax.adam(learning_rate)

  def objective(images, iteration):
    total, parts = loss_fn(images, iteration)
    return total, (total, parts)

  def body(carry, iteration):
    images, opt_state, best, best_loss = carry
    (_, (total, parts)), grads = jax.value_and_grad(
        _differentiated_once(objective, axis_name), has_aux=True)(images, iteration)
    better = total < best_loss
    best = jnp.where(better, images, best)
    best_loss = jnp.where(better, total, best_loss)
    updates, opt_state = tx.update(grads, opt_state, images)
    return (optax.apply_updates(images, updates), opt_state, best, best_loss), \
        dict(parts, total=total)

  carry = (inputs, tx.init(inputs), inputs, jnp.asarray(jnp.inf, inputs.dtype))
  (_, _, best, best_loss), parts = jax.lax.scan(body, carry, jnp.arange(iterations))
  return best, dict(jax.tree.map(lambda m: m[-1], parts), best_total=best_loss)


def synthesize_batch(key, teacher, teacher_vars, student, student_vars, *, shape, num_classes,
                     iterations, learning_rate, jitter, class_weight, tv_weight, l2_weight,
                     bn_weight, competition_weight, competition_temperature, dtype, axis_name):
  """DeepInversion's synthesis of one batch (Yin et al., CVPR 2020, Eq. 8 with ADI's
  competition; the authors' cifar10/deepinversion_cifar10.py, `get_images`): inputs drawn
  from N(0, 1), labels 0, 1, ..., C-1, 0, 1, ... along the batch, then `iterations` Adam
  steps on the inputs (`optimise_inputs`; both networks in inference mode), each on the
  batch rolled by offsets drawn uniformly from [-jitter, jitter] along height and width,
  of

    class_weight CE(teacher(x'), y) + tv_weight R_TV(x') + l2_weight ||x'||
      + bn_weight R_BN(x') + competition_weight (1 - JS(student(x'), teacher(x'))),

  x' the rolled batch, every term over the global batch. Returns this device's rows of
  the best inputs and the metrics.
  """
  batch = shape[0]
  labels = _global_slice(jnp.arange(batch) % num_classes, axis_name)
  x = _global_slice(jax.random.normal(jax.random.fold_in(key, 0), shape, dtype), axis_name)

  def loss_fn(images, iteration):
    shift = jax.random.randint(jax.random.fold_in(key, iteration + 1), (2,), -jitter,
                               jitter + 1)
    rolled = jnp.roll(images, (shift[0], shift[1]), axis=(1, 2))
    logits, _, bn = teacher_forward(teacher, teacher_vars, rolled, bn_prior=bn_weight > 0,
                                    axis_name=axis_name)
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

  return optimise_inputs(x, loss_fn, iterations=iterations, learning_rate=learning_rate,
                         axis_name=axis_name)


def data_impressions(key, teacher, teacher_vars, similarity, batch_index, *, shape,
                     iterations, learning_rate, temperature, betas, dtype, axis_name):
  """ZSKD's data impressions of one batch (Nayak et al., ICML 2019, Sec. 3.2; Algorithm
  1): the batch's class k and Dirichlet scale beta follow the batch index (the classes in
  turn, then the next scale), each row's soft target y is drawn from
  Dir(losses.dirichlet_concentration(C[k], beta)), C the teacher's class similarity, and
  inputs drawn from N(0, 1) take `iterations` Adam steps (`optimise_inputs`) on
  losses.soft_target_cross_entropy(teacher(x), y, temperature), the teacher in inference
  mode. Returns this device's rows of the best inputs and the metrics."""
  num_classes = similarity.shape[0]
  k = batch_index % num_classes
  beta = jnp.asarray(betas, jnp.float32)[(batch_index // num_classes) % len(betas)]
  concentration = losses.dirichlet_concentration(similarity[k], beta)
  targets = _global_slice(jax.random.dirichlet(jax.random.fold_in(key, 1), concentration,
                                               (shape[0],)), axis_name)
  x = _global_slice(jax.random.normal(jax.random.fold_in(key, 0), shape, dtype), axis_name)

  def loss_fn(images, iteration):
    del iteration
    logits, _ = teacher.apply(teacher_vars, images, train=False)
    loss = losses.soft_target_cross_entropy(logits, targets, temperature, axis_name=axis_name)
    return loss, {'impression': loss}

  return optimise_inputs(x, loss_fn, iterations=iterations, learning_rate=learning_rate,
                         axis_name=axis_name)


def _store_batch(bank, rows, index, axis_name):
  """The bank with every device's `rows` stored as its batch `index`, and whether they
  were finite (else the bank is unchanged: those rows stay zeros)."""
  rows = _gather_rows(rows, axis_name)
  finite = _all_finite(rows)
  stored = jax.lax.dynamic_update_slice_in_dim(bank, rows.astype(bank.dtype),
                                               index * rows.shape[0], 0)
  return jnp.where(finite, stored, bank), finite


def shift_and_flip(key, images, *, max_shift: int, flip: bool, fill):
  """Each image translated by (dy, dx), each drawn uniformly from -max_shift..max_shift,
  the shifted-in pixels taking `fill` (one value per channel), then mirrored left-right
  with probability 1/2 where `flip`. The on-device counterpart of the teacher's host-side
  augmentation (data.random_shift, data.random_flip), for sets that live on the device."""
  n, h, w, c = images.shape
  shift_key, flip_key = jax.random.split(key)
  if max_shift:
    m = max_shift
    fill = jnp.broadcast_to(jnp.asarray(fill, images.dtype), (c,))
    widths = ((0, 0), (m, m), (m, m), (0, 0))
    inside = jnp.pad(jnp.ones((1, h, w, 1), bool), widths)
    padded = jnp.where(inside, jnp.pad(images, widths), fill)
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * m + 1)
    images = jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)
  return images


def _distil_on_bank(s_state, key, bank, filled, *, teacher, teacher_vars, student, tx_student,
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
    images = _global_slice(batch, axis_name)
    teacher_logits, _ = teacher.apply(teacher_vars, images, train=False)
    return kd_update(s_state, images, teacher_logits, student=student, tx=tx_student,
                     temperature=temperature, axis_name=axis_name)

  s_state, kd = jax.lax.scan(update, s_state, jnp.arange(updates))
  return s_state, kd[-1]


def _synthesis_state(state, bank, s_state, finite):
  """A synthesis method's next state; a batch that was not finite counts as a bad step."""
  bad, missed = s_state['nonfinite'], jnp.where(finite, 0, 1).astype(jnp.int32)
  return {'step': state['step'] + 1, 'bank': bank, 'student': s_state,
          'nonfinite': {'total': bad['total'] + missed, 'streak': bad['streak'] + missed}}


def deepinversion_step(state, frozen, root_key, *, teacher, student, tx_student, shape,
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
      jax.lax.stop_gradient(variables_of(state['student'])), shape=shape,
      num_classes=num_classes, axis_name=axis_name, **synthesis)
  bank, finite = _store_batch(state['bank'], best, state['step'], axis_name)
  s_state, kd = _distil_on_bank(
      state['student'], jax.random.fold_in(key, 1), bank, (state['step'] + 1) * shape[0],
      teacher=teacher, teacher_vars=frozen['teacher'], student=student,
      tx_student=tx_student, updates=student_updates, batch_size=student_batch_size,
      temperature=temperature, axis_name=axis_name)
  return _synthesis_state(state, bank, s_state, finite), dict(parts, kd=kd)


def zskd_step(state, frozen, root_key, *, teacher, student, tx_student, shape, batches,
              synthesis, augmentation, student_updates, student_batch_size, temperature,
              axis_name):
  """One step of ZSKD (Nayak et al. 2019): the first `batches` steps each make one batch
  of data impressions (`data_impressions`) and store it in the bank; each later step
  takes `student_updates` KD steps of the student on batches drawn uniformly from the
  whole set, which is complete by then, as the paper distils after synthesising, each
  batch augmented by `shift_and_flip(**augmentation)` as the paper augments the
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
    bank, finite = _store_batch(state['bank'], best, state['step'], axis_name)
    metrics = jax.tree.map(lambda a, b: a.astype(b.dtype), dict(empty, **parts), empty)
    return _synthesis_state(state, bank, state['student'], finite), metrics

  def distil(state):
    s_state, kd = _distil_on_bank(
        state['student'], jax.random.fold_in(key, 1), state['bank'], batches * shape[0],
        teacher=teacher, teacher_vars=frozen['teacher'], student=student,
        tx_student=tx_student, updates=student_updates, batch_size=student_batch_size,
        temperature=temperature, axis_name=axis_name,
        augment=functools.partial(shift_and_flip, **augmentation))
    return (_synthesis_state(state, state['bank'], s_state, True),
            dict(empty, kd=kd.astype(jnp.float32)))

  return jax.lax.cond(state['step'] < batches, synthesise, distil, state)


def optimizer(cfg, steps: int, steps_per_epoch: int):
  """The optax optimizer of a stage's config: Adam or SGD with momentum, an optional L2
  term added to the gradient (PyTorch's weight_decay) and a learning-rate schedule over
  the stage's `steps` ('step': times decay_factor after each of decay_epochs)."""
  lr = cfg.learning_rate
  if cfg.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(lr, max(steps, 1))
  elif cfg.schedule == 'step':
    lr = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs})
  tx = optax.sgd(lr, momentum=cfg.momentum or None) if cfg.optimizer == 'sgd' else optax.adam(lr)
  if cfg.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
  return tx
