"""The machinery every method's train steps share: gradient application with skipped
non-finite steps, train states, the frozen teacher's forward, the KD update, the
optimisation of inputs, and batch slicing across devices; and the teacher's step.
Each method's own steps are in its module under `rdskd_jax/methods/`.

Each step is written once, for one device, as
    step(state, frozen, root_key, *batch, axis_name) -> (state, metrics)
with every batch reduction a collective over `axis_name` (None: no collectives);
`parallel.py` turns it into a data-parallel (or run-batched) program. The state is a plain
pytree: step, params, opt_state, skipped-step counters and the entries a network updates
besides its parameters (BatchNorm statistics, loss references).
"""


import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from rdskd_jax import losses


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


def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def read_once(flag, axis_name):
  """`flag` (the same on every device) as the output of a cross-device minimum, which XLA
  neither fuses nor removes. Its consumers then read one value, where otherwise XLA copies
  the flag's whole chain of scalar operations (one per parameter array) into each of them:
  a program quadratic in the parameter arrays, slow to compile (benchmarks/README.md).
  The same value, for one scalar collective a step."""
  if axis_name is None:
    return flag
  return jax.lax.pmin(flag.astype(jnp.int32), axis_name).astype(bool)


def in_compute_precision(params, dtype):
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
  # Rounded to the parameters' dtype only after the average (see in_compute_precision).
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  if 'lr_scale' in state:  # Sweeps: `tx` has learning rate 1, the state holds the run's.
    updates = jax.tree.map(lambda u: u * state['lr_scale'].astype(u.dtype), updates)
  updated = dict(state, params=optax.apply_updates(state['params'], updates),
                 opt_state=opt_state, **new_parts)
  finite = (jnp.isfinite(loss) & all_finite(grads)
            & all_finite((updated['params'], new_parts)))
  finite = read_once(finite, axis_name)
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
      in_compute_precision(state['params'], model.dtype))
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


def generate_for_teacher(generator, params, batch_stats, z, teacher, teacher_vars,
                         bn_prior_weight, axis_name):
  """What a generator loss sees: the images of the generator in training mode (BatchNorm
  on the batch) and its new statistics, and the frozen teacher's logits, features and
  BatchNorm prior on them (the prior computed only when it is weighted)."""
  images, updates = generator.apply({'params': params, 'batch_stats': batch_stats}, z,
                                    train=True, mutable=['batch_stats'])
  logits, features, bn_prior = teacher_forward(
      teacher, teacher_vars, images, bn_prior=bn_prior_weight > 0, axis_name=axis_name)
  return images, updates['batch_stats'], logits, features, bn_prior


def with_bn_prior(total, aux, bn_prior, bn_prior_weight):
  """A generator loss and its parts with the weighted BatchNorm prior added, if any."""
  if bn_prior_weight > 0:
    return total + bn_prior_weight * bn_prior, dict(aux, bn_prior=bn_prior)
  return total, aux


def kd_update(state, images, teacher_logits, *, student, tx, temperature, axis_name):
  """One KD step of the student's train state on `images`, the teacher's logits on them
  as targets (losses.kd_loss at `temperature`): the step of every method's student but
  DFAD's. Returns the new state and the loss."""
  def loss_fn(params):
    (student_logits, _), new_parts = train_forward(student, state, params, images)
    return losses.kd_loss(student_logits, teacher_logits, temperature,
                          axis_name=axis_name), new_parts

  (loss, new_parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      in_compute_precision(state['params'], student.dtype))
  return apply_gradients(state, grads, tx, axis_name, loss, **new_parts), loss


def same_dtypes(new, old):
  """`new` cast to the dtypes of `old` (a scan carries one type from step to step)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def global_slice(x, axis_name):
  """This device's rows of a global batch `x` drawn alike on every device."""
  if axis_name is None:
    return x
  per = x.shape[0] // jax.lax.axis_size(axis_name)
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * per, per)


def gather_rows(local, axis_name):
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
