"""The RDSKD pipeline: teacher on real data, generator against the frozen teacher, student
distilled on generated samples only, both classifiers evaluated on the real test split.

`train_and_evaluate(config, workdir)` is the one entry point of the command line, the tests
and the notebooks. Each stage resumes from its latest checkpoint in the workdir, and its
random streams derive from (seed, stage, step), so a resumed run computes what an
uninterrupted one does.
"""

import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import flax.linen as nn
from flax import traverse_util
from jax.experimental import multihost_utils

from rdskd_jax import config_lib, data, diagnostics, losses, models, parallel


class RunStopped(Exception):
  """A run that stopped before its end on purpose; the message says why and what next."""


class NonFiniteError(RunStopped):
  """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(RunStopped):
  """SIGTERM arrived; the state of the last finished step is checkpointed."""


class _SigtermFlag:
  """Within `with`, SIGTERM sets `.raised` instead of killing the process (main thread
  only; elsewhere, as in some notebook kernels, SIGTERM keeps its usual effect)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


_STAGE_KEYS = {'teacher': 0, 'generator': 1, 'student': 2, 'samples': 3, 'fidelity': 4,
               'diagnostics': 5, 'dafl': 6}


def samples_key(config):
  """The key of the noise behind samples.png (the same picture on every refresh)."""
  return jax.random.fold_in(jax.random.key(config.seed), _STAGE_KEYS['samples'])


# ---------------------------------------------------------------------------- steps


def _local_noise(key, batch_size, latent_dim, axis_name):
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


def _apply_gradients(state, grads, tx, axis_name, loss, **new_parts):
  """One Adam step, with `new_parts` (BatchNorm statistics, loss references) replacing
  their state entries; skipped when the loss or any gradient is not finite.

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
  finite = jnp.isfinite(loss) & _all_finite(grads)
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  bad = state['nonfinite']
  return dict(kept, step=state['step'] + 1, nonfinite={
      'total': bad['total'] + jnp.where(finite, 0, 1).astype(jnp.int32),
      'streak': jnp.where(finite, 0, bad['streak'] + 1).astype(jnp.int32)})


def new_train_state(params, tx, **extra):
  """A stage's train state at step 0: parameters, optimizer state, the skipped-step
  counters, and `extra` entries (BatchNorm statistics, loss references)."""
  return {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params),
          'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}, **extra}


def classifier_init(model, key, image_shape):
  """(params, other variable collections) of a classifier, e.g. BatchNorm statistics."""
  variables = model.init(key, jnp.zeros((1, *image_shape)))
  return variables['params'], {k: v for k, v in variables.items() if k != 'params'}


def variables_of(state):
  """The variables a classifier's train state stands for (params and, where it has
  BatchNorm, its running statistics)."""
  return {'params': state['params'],
          **({'batch_stats': state['batch_stats']} if 'batch_stats' in state else {})}


def _train_forward(model, state, params, images):
  """A classifier in training mode: ((logits, features), state entries it updates)."""
  if 'batch_stats' not in state:
    return model.apply({'params': params}, images, train=True), {}
  out, updates = model.apply({'params': params, 'batch_stats': state['batch_stats']}, images,
                             train=True, mutable=['batch_stats'])
  return out, {'batch_stats': updates['batch_stats']}


def random_flip(rng: np.random.Generator, images, enabled: bool):
  """Mirrors each image left-right with probability 1/2."""
  if not enabled:
    return images
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def random_shift(rng: np.random.Generator, images, max_shift: int, fill):
  """Translates each image by up to `max_shift` pixels per axis, filling with `fill`
  (one value per channel)."""
  if max_shift == 0:
    return images
  n, h, w, c = images.shape
  m = max_shift
  padded = np.empty((n, h + 2 * m, w + 2 * m, c), images.dtype)
  padded[...] = fill
  padded[:, m:m + h, m:m + w] = images
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
  rows = (dy[:, None] + np.arange(h))[:, :, None]
  cols = (dx[:, None] + np.arange(w))[:, None, :]
  return padded[np.arange(n)[:, None, None], rows, cols]


def teacher_step(state, frozen, root_key, images, labels, *, model, tx, axis_name):
  """One optimizer step of the teacher on a real batch (cross-entropy)."""
  del frozen, root_key  # Batch order and augmentation are drawn on the host.
  model = model.clone(axis_name=axis_name)

  def loss_fn(params):
    (logits, _), new_parts = _train_forward(model, state, params, images)
    loss = losses.cross_entropy_loss(logits, labels, axis_name=axis_name)
    return loss, (logits, new_parts)

  (loss, (logits, new_parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _in_compute_precision(state['params'], model.dtype))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  if axis_name is not None:
    accuracy = jax.lax.pmean(accuracy, axis_name)
  return (_apply_gradients(state, grads, tx, axis_name, loss, **new_parts),
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
  mean_of = lambda x: losses._global_mean(x, axis_name)
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


def generator_step(state, frozen, root_key, *, generator, teacher, tx, batch_size,
                   latent_dim, epoch_length, axis_name, bn_prior_weight=0.0):
  """One RDSKD generator step (teacher frozen in inference mode).

  The loss references refresh, after this step's loss is computed, when the step is at
  index 1 of its epoch, as in the authors' code.
  """
  z = _local_noise(jax.random.fold_in(root_key, state['step']), batch_size, latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  ref_one_hot, ref_entropy = state['loss_refs'][0], state['loss_refs'][1]

  def loss_fn(params):
    images, updates = generator.apply(
        {'params': params, 'batch_stats': state['batch_stats']}, z, train=True,
        mutable=['batch_stats'])
    teacher_logits, _, bn_prior = teacher_forward(
        teacher, frozen['teacher'], images, bn_prior=bn_prior_weight > 0, axis_name=axis_name)
    total, aux = losses.rdskd_generator_loss(images, teacher_logits, ref_one_hot,
                                             ref_entropy, axis_name=axis_name)
    if bn_prior_weight > 0:
      total, aux = total + bn_prior_weight * bn_prior, dict(aux, bn_prior=bn_prior)
    return total, (aux, updates['batch_stats'])

  (total, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _in_compute_precision(state['params'], generator.dtype))
  refresh = state['step'] % epoch_length == 1
  new_refs = jnp.where(refresh, jnp.stack([aux['one_hot'], aux['information_entropy']]),
                       state['loss_refs']).astype(state['loss_refs'].dtype)
  state = _apply_gradients(state, grads, tx, axis_name, total, batch_stats=batch_stats,
                           loss_refs=new_refs)
  return state, dict(aux, total=total)


def student_step(state, frozen, root_key, *, generator, teacher, student, tx, batch_size,
                 latent_dim, temperature, axis_name, generator_batchnorm='running'):
  """One KD step of the student on fresh samples of the frozen generator (its BatchNorm
  in `generator_batchnorm` mode, models.generate)."""
  z = _local_noise(jax.random.fold_in(root_key, state['step']), batch_size, latent_dim, axis_name)
  images = models.generate(generator, frozen['generator'], z, generator_batchnorm, axis_name)
  teacher_logits, _ = teacher.apply(frozen['teacher'], images, train=False)
  student = student.clone(axis_name=axis_name)

  def loss_fn(params):
    (student_logits, _), new_parts = _train_forward(student, state, params, images)
    loss = losses.kd_loss(student_logits, teacher_logits, temperature, axis_name=axis_name)
    return loss, new_parts

  (loss, new_parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _in_compute_precision(state['params'], student.dtype))
  return _apply_gradients(state, grads, tx, axis_name, loss, **new_parts), {'kd': loss}


def dafl_step(state, frozen, root_key, *, generator, teacher, student, tx_generator,
              tx_student, batch_size, latent_dim, alpha, beta, temperature, axis_name,
              bn_prior_weight=0.0):
  """One DAFL step (Chen et al. 2019): generator and student trained together.

  The generator (BatchNorm in training mode) makes a batch; it takes a step on
  L_oh + alpha L_a + beta L_ie10 (+ the BatchNorm prior) against the frozen teacher, and
  the student takes a KD step on the same images and teacher logits (no gradient to the
  generator), as in DAFL's DAFL_train.py.
  """
  z = _local_noise(jax.random.fold_in(root_key, state['step']), batch_size, latent_dim, axis_name)
  generator = generator.clone(axis_name=axis_name)
  student = student.clone(axis_name=axis_name)
  g_state, s_state = state['generator'], state['student']

  def generator_loss(params):
    images, updates = generator.apply(
        {'params': params, 'batch_stats': g_state['batch_stats']}, z, train=True,
        mutable=['batch_stats'])
    logits, features, bn_prior = teacher_forward(
        teacher, frozen['teacher'], images, bn_prior=bn_prior_weight > 0, axis_name=axis_name)
    total, aux = losses.dafl_generator_loss(logits, features, alpha, beta, axis_name=axis_name)
    if bn_prior_weight > 0:
      total, aux = total + bn_prior_weight * bn_prior, dict(aux, bn_prior=bn_prior)
    return total, (aux, updates['batch_stats'], images, logits)

  (g_total, (aux, g_stats, images, teacher_logits)), g_grads = jax.value_and_grad(
      generator_loss, has_aux=True)(_in_compute_precision(g_state['params'], generator.dtype))
  images, teacher_logits = jax.lax.stop_gradient((images, teacher_logits))

  def student_loss(params):
    (student_logits, _), new_parts = _train_forward(student, s_state, params, images)
    return losses.kd_loss(student_logits, teacher_logits, temperature,
                          axis_name=axis_name), new_parts

  (kd, s_parts), s_grads = jax.value_and_grad(student_loss, has_aux=True)(
      _in_compute_precision(s_state['params'], student.dtype))
  g_state = _apply_gradients(g_state, g_grads, tx_generator, axis_name, g_total,
                             batch_stats=g_stats)
  s_state = _apply_gradients(s_state, s_grads, tx_student, axis_name, kd, **s_parts)
  bad_g, bad_s = g_state['nonfinite'], s_state['nonfinite']
  return ({'step': state['step'] + 1, 'generator': g_state, 'student': s_state,
           'nonfinite': {'total': bad_g['total'] + bad_s['total'],
                         'streak': jnp.maximum(bad_g['streak'], bad_s['streak'])}},
          dict(aux, total=g_total, kd=kd))


# ------------------------------------------------------------------- run machinery


def _optimizer(cfg, steps: int, steps_per_epoch: int):
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


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` as JSON to `path` through a temporary file (process 0 only)."""
  if not parallel.is_main_process():
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard event files in
  `<workdir>/tensorboard` (through clu's metric writers: scalars as `stage/name`, and
  images), written by process 0. Lines of a stage past the step it resumes from are
  dropped from metrics.jsonl, so a resumed run leaves the file an uninterrupted run writes
  (TensorBoard shows the re-run steps twice)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if parallel.is_main_process():
      from clu import metric_writers
      self.writer = metric_writers.create_default_writer(
          os.path.join(os.path.abspath(workdir), 'tensorboard'), asynchronous=False)

  def resume(self, stage: str, step: int) -> None:
    if not parallel.is_main_process() or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if r['stage'] != stage or r['step'] <= step]
    if len(keep) != len(rows):
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
      os.replace(self.path + '.tmp', self.path)

  def write(self, stage: str, step: int, metrics: Dict[str, float]) -> None:
    if not parallel.is_main_process():
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'stage': stage, 'step': step, **metrics}) + '\n')
    self.writer.write_scalars(step, {f'{stage}/{k}': v for k, v in metrics.items()})

  def write_images(self, stage: str, step: int, images: Dict[str, np.ndarray]) -> None:
    """TensorBoard images, each (H, W, C) in [0, 1]."""
    if self.writer is not None:
      self.writer.write_images(step, {f'{stage}/{k}': v[None] for k, v in images.items()})

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()


class Progress:
  """Progress lines on stderr: step, metrics, steps/s and ETA."""

  def __init__(self, stage: str, start: int, total: int):
    self.stage, self.start, self.total = stage, start, total
    self.t0 = time.perf_counter()

  def show(self, step: int, metrics: Dict[str, float]) -> None:
    if not parallel.is_main_process():
      return
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    parts = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
    print(f'[{self.stage}] step {step}/{self.total} {parts} {rate:.2f} steps/s '
          f'ETA {eta:.0f}s', file=sys.stderr, flush=True)


def _checkpoint_manager(workdir: str, stage: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints', stage),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _restore_like(manager, step, template):
  restored = manager.restore(step, args=ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, template)))
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))


def _run_stage(stage, config, workdir, par, state, frozen, step_fn, total_steps, log,
               batches=None, report_every=0, report_fn=None):
  """Runs a stage from its latest checkpoint to `total_steps`; returns (state, seconds).

  `batches(step)`, when given, returns the host batch arrays of a step. Every
  `report_every` steps, `report_fn(host_state)` adds metrics to that step's log line; it
  is for reporting only: nothing in training reads what it returns. Its time is not
  counted in the stage's seconds.
  """
  manager = _checkpoint_manager(workdir, stage)
  start = manager.latest_step() or 0
  if start:
    state = _restore_like(manager, start, state)
  log.resume(stage, start)
  root_key = jax.random.fold_in(jax.random.key(config.seed), _STAGE_KEYS[stage])
  wrapped = par.wrap(step_fn, num_batch_args=0 if batches is None else 2)
  device_state, device_frozen = par.replicate(state), par.replicate(frozen)
  progress = Progress(stage, start, total_steps)
  t0, reporting_seconds = time.perf_counter(), 0.0
  with _SigtermFlag() as sigterm:
    for step in range(start, total_steps):
      args = () if batches is None else tuple(par.split_batch(b) for b in batches(step))
      device_state, metrics = wrapped(device_state, device_frozen, root_key, *args)
      done = step + 1
      report_now = report_every and done % report_every == 0
      if done % config.log_every == 0 or done == total_steps or report_now:
        metrics = {k: float(v) for k, v in par.to_host(metrics).items()}
        nonfinite = par.to_host(device_state['nonfinite'])
        metrics['skipped_steps'] = int(nonfinite['total'])
        if nonfinite['streak'] >= config.max_bad_steps:
          last_good = manager.latest_step()
          raise NonFiniteError(
              f'{stage}: {int(nonfinite["streak"])} consecutive steps up to step {done} had a '
              f'non-finite loss or gradient and were skipped (config.max_bad_steps='
              f'{config.max_bad_steps}); the last checkpoint is step {last_good}. Try a '
              'lower learning rate.')
        if report_now:
          t_report = time.perf_counter()
          metrics.update(report_fn(par.to_host(device_state)))
          reporting_seconds += time.perf_counter() - t_report
        log.write(stage, done, metrics)
        progress.show(done, metrics)
      if done % config.checkpoint_every == 0 or done == total_steps or sigterm.raised:
        manager.save(done, args=ocp.args.StandardSave(par.to_host(device_state)))
      if sigterm.raised and done < total_steps:
        manager.wait_until_finished()
        raise Preempted(f'{stage}: stopped by SIGTERM after step {done}/{total_steps}, which '
                        'is checkpointed; run the same command again to resume')
  manager.wait_until_finished()
  log.flush()
  return par.to_host(device_state), time.perf_counter() - t0 - reporting_seconds


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, variables, images):
  return jnp.argmax(model.apply(variables, images, train=False)[0], -1)


def evaluate(model, variables, images, labels, batch_size: int) -> float:
  """Top-1 accuracy of a classifier in inference mode, on (images, labels) of every
  process together (each process holds its own share of the split)."""
  correct = 0
  for i in range(0, len(images), batch_size):
    predicted = _predict(model, variables, images[i:i + batch_size])
    correct += int(jnp.sum(predicted == labels[i:i + batch_size]))
  counts = np.array([correct, len(images)], np.int64)
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).sum(axis=0)
  return int(counts[0]) / int(counts[1])


def sampling(config) -> Dict[str, Any]:
  """How the student stage samples the generator, as keyword arguments of
  generated_agreement and of the diagnostics: the BatchNorm mode and, in 'batch' mode,
  the student's batch size (a batch's statistics depend on its size)."""
  mode = config.student.generator_batchnorm
  if mode == 'batch':
    return {'batchnorm': mode, 'batch_size': config.student.batch_size}
  return {'batchnorm': mode}


def generated_agreement(generator, generator_vars, teacher, teacher_vars, student,
                        student_vars, latent_dim, key, num_samples=4096, batch_size=512,
                        batchnorm='running'):
  """Share of fresh generated samples on which student and teacher agree (top-1).

  A data-free measure of how well the student imitates the teacher, on samples it never
  trained on; unlike test accuracy it may guide choices of settings. Samples are drawn
  `batch_size` at a time, the generator's BatchNorm in `batchnorm` mode (models.generate).
  """
  @jax.jit
  def agree(z):
    images = models.generate(generator, generator_vars, z, batchnorm)
    t = teacher.apply(teacher_vars, images, train=False)[0]
    s = student.apply(student_vars, images, train=False)[0]
    return jnp.sum(jnp.argmax(t, -1) == jnp.argmax(s, -1))

  total = 0
  batch_size = min(batch_size, num_samples)
  for i in range(num_samples // batch_size):
    total += int(agree(jax.random.normal(jax.random.fold_in(key, i), (batch_size, latent_dim))))
  return total / (num_samples // batch_size * batch_size)


# ------------------------------------------------------------------------ stages


def train_teacher(config, workdir, par, model, log, channels):
  """Teacher on the real train split; returns (variables, seconds trained this run)."""
  images, labels = data.load_split(config, 'train', config.teacher.max_train_examples)
  batch = config.teacher.batch_size
  if len(images) < batch:
    raise config_lib.ConfigError(
        f'config.teacher.batch_size={batch}: expected at most the {len(images)} train '
        f'examples of {config.dataset}')
  steps_per_epoch = len(images) // batch
  total = steps_per_epoch * config.teacher.epochs
  tx = _optimizer(config.teacher, total, steps_per_epoch)
  params, collections = classifier_init(
      model, jax.random.key(config.seed), (config.image_size, config.image_size, channels))
  state = new_train_state(params, tx, **collections)

  # Shifted-in pixels take the value of a black pixel after normalisation.
  fill = -np.asarray(config.mean, np.float32) / np.asarray(config.std, np.float32)

  def batches(step):
    """Epoch e visits the split in a permutation drawn from (seed, e); shifts and flips
    from the step."""
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(images))
    take = order[index * batch:(index + 1) * batch]
    rng = np.random.default_rng([config.seed, epoch, index])
    augmented = random_shift(rng, images[take], config.teacher.max_shift, fill)
    return random_flip(rng, augmented, config.teacher.flip), labels[take]

  step_fn = functools.partial(teacher_step, model=model, tx=tx)
  state, seconds = _run_stage('teacher', config, workdir, par, state, {}, step_fn, total,
                              log, batches)
  return variables_of(state), seconds, total


def restore_teacher(config, model, channels: int):
  """The variables saved at `config.teacher.checkpoint` (a `teacher_variables` directory)."""
  path = os.path.abspath(config.teacher.checkpoint)
  if not os.path.isdir(path):
    raise config_lib.ConfigError(
        f'config.teacher.checkpoint={config.teacher.checkpoint!r}: no such checkpoint '
        'directory (expected the teacher_variables directory of an earlier run)')
  template = model.init(jax.random.key(0), jnp.zeros(
      (1, config.image_size, config.image_size, channels)))
  try:
    restored = ocp.StandardCheckpointer().restore(
        path, jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  except Exception as e:  # Orbax raises several types for unreadable checkpoints.
    raise config_lib.ConfigError(
        f'config.teacher.checkpoint={config.teacher.checkpoint!r}: not a readable '
        f'{config.teacher.model} checkpoint ({type(e).__name__})') from None
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))


def _teacher_variables(config, workdir, par, model, log, channels, report):
  """The frozen teacher: from config.teacher.checkpoint, else trained (or resumed) here.

  A trained teacher's variables are also saved alone in `<workdir>/teacher_variables`,
  the directory another run's `teacher.checkpoint` can point at.
  """
  if config.teacher.checkpoint:
    variables = restore_teacher(config, model, channels)
    return variables, {'checkpoint': os.path.abspath(config.teacher.checkpoint), 'seconds': 0.0}
  variables, seconds, steps = train_teacher(config, workdir, par, model, log, channels)
  path = os.path.join(os.path.abspath(workdir), 'teacher_variables')
  exists = os.path.exists(path)
  if jax.process_count() > 1:  # Every process saves (Orbax coordinates), or none does.
    exists = bool(multihost_utils.broadcast_one_to_all(np.array(exists)))
  if not exists:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, variables)
    checkpointer.wait_until_finished()
  return variables, {'steps': steps, 'seconds': _total_seconds(report, 'teacher', seconds)}


def _total_seconds(report, stage, seconds_this_run):
  """A stage's training time over all runs of the workdir (resumed runs add theirs)."""
  return report.get(stage, {}).get('seconds', 0.0) + seconds_this_run


def _say(line: str) -> None:
  if parallel.is_main_process():
    print(line, file=sys.stderr, flush=True)


def setup_parallel(config) -> parallel.DataParallel:
  """Joins a multi-process run if asked, checks the config against the devices there
  are, and returns the data-parallel wrapper of `config.parallel`."""
  parallel.initialize_distributed(config)
  config_lib.validate(config, jax.device_count())
  try:
    return parallel.DataParallel(config.parallel, config.num_devices)
  except ValueError as e:  # What validate cannot see: a multi-process run's constraints.
    raise config_lib.ConfigError(f'config.parallel={config.parallel!r}, '
                                 f'config.num_devices={config.num_devices}: {e}') from None


def build_networks(config, num_classes: int, channels: int):
  """The run's (teacher, generator, student) modules, computing in `config.dtype`."""
  dtype = models.DTYPES[config.dtype]
  teacher = models.create_classifier(config.teacher.model, num_classes, dtype)
  generator = models.Generator(image_size=config.image_size, channels=channels,
                               subpixel=config.generator.subpixel, dtype=dtype)
  student = models.create_classifier(config.student.model, num_classes, dtype)
  return teacher, generator, student


def generator_setup(config, generator, teacher):
  """The generator's initial train state and its per-device step (teacher frozen)."""
  gcfg = config.generator
  gen_vars = generator.init(jax.random.key(config.seed), jnp.zeros((2, gcfg.latent_dim)))
  tx = _optimizer(gcfg, gcfg.steps, gcfg.epoch_length)
  state = new_train_state(gen_vars['params'], tx, batch_stats=gen_vars['batch_stats'],
                          loss_refs=jnp.zeros(2, jnp.float32))
  step_fn = functools.partial(generator_step, generator=generator, teacher=teacher, tx=tx,
                              batch_size=gcfg.batch_size,
                              latent_dim=gcfg.latent_dim, epoch_length=gcfg.epoch_length,
                              bn_prior_weight=gcfg.bn_prior_weight)
  return state, step_fn


def dafl_setup(config, channels: int, generator, teacher, student):
  """DAFL's joint initial state (generator and student train states) and its step."""
  dcfg, gcfg = config.dafl, config.generator
  gen_vars = generator.init(jax.random.key(config.seed), jnp.zeros((2, gcfg.latent_dim)))
  tx_generator = optax.adam(dcfg.generator_learning_rate)
  tx_student = optax.adam(dcfg.student_learning_rate)
  params, collections = classifier_init(student, jax.random.key(config.seed + 1),
                                        (config.image_size, config.image_size, channels))
  state = {'step': jnp.int32(0),
           'generator': new_train_state(gen_vars['params'], tx_generator,
                                        batch_stats=gen_vars['batch_stats']),
           'student': new_train_state(params, tx_student, **collections),
           'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}}
  step_fn = functools.partial(
      dafl_step, generator=generator, teacher=teacher, student=student,
      tx_generator=tx_generator, tx_student=tx_student, batch_size=dcfg.batch_size,
      latent_dim=gcfg.latent_dim, alpha=dcfg.alpha, beta=dcfg.beta,
      temperature=dcfg.temperature, bn_prior_weight=gcfg.bn_prior_weight)
  return state, step_fn


def student_setup(config, channels: int, generator, teacher, student):
  """The student's initial train state and its per-device step (generator and teacher
  frozen)."""
  scfg = config.student
  params, collections = classifier_init(student, jax.random.key(config.seed + 1),
                                        (config.image_size, config.image_size, channels))
  tx = _optimizer(scfg, scfg.steps, scfg.epoch_length)
  state = new_train_state(params, tx, **collections)
  step_fn = functools.partial(student_step, generator=generator, teacher=teacher,
                              student=student, tx=tx, batch_size=scfg.batch_size,
                              latent_dim=config.generator.latent_dim,
                              temperature=scfg.temperature,
                              generator_batchnorm=scfg.generator_batchnorm)
  return state, step_fn


# Fields that change how a run is executed or reported, never what it computes; a
# workdir may be resumed with other values of these.
RESUMABLE_FIELDS = ('preset', 'data_dir', 'parallel', 'num_devices', 'distributed',
                    'checkpoint_every', 'log_every', 'eval_batch_size', 'max_bad_steps',
                    'student.eval_every', 'image_every', 'diagnostic_samples')
_RUN_FILES = ('checkpoints', 'teacher_variables', 'metrics.jsonl', 'report.json',
              'samples.png', 'curves.png', 'config.json', 'normalization.json', 'tensorboard')


# Fields added after runs were written, with the value those runs had: a workdir or
# report.json without one stands for that value.
FIELDS_ADDED_LATER = {'student.generator_batchnorm': 'running'}


def with_fields_added_later(saved: Dict[str, Any]) -> Dict[str, Any]:
  """A saved config (nested dict) with FIELDS_ADDED_LATER filled in where it lacks them."""
  flat = traverse_util.flatten_dict(saved, sep='.', keep_empty_nodes=True)
  return traverse_util.unflatten_dict({**FIELDS_ADDED_LATER, **flat}, sep='.')


def config_differences(saved: Dict[str, Any], config) -> Dict[str, tuple]:
  """{field: (saved value, new value)} of the fields that change a run's results."""
  old = traverse_util.flatten_dict(with_fields_added_later(saved), sep='.')
  new = traverse_util.flatten_dict(json.loads(json.dumps(config.to_dict())), sep='.')
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)}


def prepare_workdir(config, workdir: str, overwrite: bool = False) -> None:
  """Creates the workdir, checks that it is writable, and refuses one that holds a run of
  a different config (`overwrite`: delete that run's files first)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{jax.process_index()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise config_lib.ConfigError(
        f'workdir {workdir!r}: cannot write there ({e.strerror or type(e).__name__}); '
        'choose a directory you can write to') from None
  saved_path = os.path.join(workdir, 'config.json')
  if os.path.exists(saved_path):
    differences = config_differences(json.load(open(saved_path)), config)
    if differences and not overwrite:
      listed = '; '.join(f'{k}: {a!r} there, {b!r} now' for k, a, b in
                         ((k, *v) for k, v in differences.items()))
      raise config_lib.ConfigError(
          f'workdir {workdir!r} holds a run of another config ({listed}); use another '
          'workdir, or --overwrite to delete that run')
    if differences and parallel.is_main_process():
      for name in _RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
  if not os.path.exists(saved_path):
    write_json_atomic(saved_path, config.to_dict())


def train_and_evaluate(config, workdir: str, overwrite: bool = False) -> Dict[str, Any]:
  """Runs all stages (resuming any that are done or partly done); returns the report.

  A workdir that holds a run of a different config is refused unless `overwrite`.
  """
  par = setup_parallel(config)
  prepare_workdir(config, workdir, overwrite)
  config, dataset_notes = data.resolve_dataset_fields(config, workdir)
  report_path = os.path.join(workdir, 'report.json')
  report = json.load(open(report_path)) if os.path.exists(report_path) else {}
  num_classes, channels = dataset_notes['num_classes'], dataset_notes['channels']
  log = MetricsLog(workdir)
  report.update({
      'dataset': config.dataset, 'dataset_fields': dataset_notes, 'preset': config.get('preset', ''), 'devices': par.num_devices,
      'processes': jax.process_count(),
      'parallel': config.parallel, 'platform': jax.default_backend(),
      'jax_version': jax.__version__, 'seed': config.seed, 'config': config.to_dict(),
  })
  test_images, test_labels = data.load_split(config, 'test', per_process=True)

  teacher, generator, student = build_networks(config, num_classes, channels)
  t0 = time.perf_counter()
  teacher_vars, teacher_report = _teacher_variables(config, workdir, par, teacher, log,
                                                    channels, report)
  if config.generator.bn_prior_weight > 0 and 'batch_stats' not in teacher_vars:
    raise config_lib.ConfigError(
        f'config.generator.bn_prior_weight={config.generator.bn_prior_weight}: expected 0 for '
        f'teacher {config.teacher.model!r}, which has no BatchNorm statistics to match')
  teacher_report['test_accuracy'] = evaluate(teacher, teacher_vars, test_images, test_labels,
                                             config.eval_batch_size)
  report['teacher'] = {**report.get('teacher', {}), **teacher_report}
  write_json_atomic(report_path, report)
  _say(f'[teacher] test accuracy {teacher_report["test_accuracy"]:.4f} '
      f'({time.perf_counter() - t0:.0f}s)')

  gcfg = config.generator
  watch_key = jax.random.fold_in(jax.random.key(config.seed), _STAGE_KEYS['diagnostics'])

  def watch_generator(gen_state):
    """Reporting only: a sample grid for TensorBoard and the coverage of 512 samples."""
    variables = {'params': gen_state['params'], 'batch_stats': gen_state['batch_stats']}
    images = diagnostics.generated_images(generator, variables, gcfg.latent_dim, watch_key, 512)
    probs, features = diagnostics.teacher_outputs(teacher, teacher_vars, images)
    if parallel.is_main_process():
      from rdskd_jax import plot
      log.write_images('generator', int(gen_state['step']),
                       {'samples': plot.sample_grid(images[:64], config)})
    return diagnostics.sample_statistics(probs, features)

  def test_accuracy_of(student_state):
    """Reporting only: the student's accuracy on the test split."""
    return {'test_accuracy': evaluate(student, variables_of(student_state), test_images,
                                      test_labels, config.eval_batch_size)}

  def add_diagnostics(gen_vars, step):
    if 'diagnostics' not in report:  # Once per trained generator (a rerun reuses them).
      # Reporting only (after the generator has trained; nothing reads these back).
      report['diagnostics'] = diagnostics.generator_diagnostics(
          generator, gen_vars, teacher, teacher_vars, gcfg.latent_dim, watch_key,
          config.diagnostic_samples, test_images=test_images, **sampling(config))
      log.write('diagnostics', step, report['diagnostics'])
      log.flush()
      _say('[diagnostics] ' + ' '.join(f'{k}={v:.4g}' for k, v in report['diagnostics'].items()))
    write_json_atomic(report_path, report)

  if config.method == 'dafl':
    dcfg = config.dafl
    state, step_fn = dafl_setup(config, channels, generator, teacher, student)
    every = config.student.eval_every
    state, seconds = _run_stage(
        'dafl', config, workdir, par, state, {'teacher': teacher_vars}, step_fn, dcfg.steps,
        log, report_every=every,
        report_fn=lambda s: {**watch_generator(s['generator']), **test_accuracy_of(s['student'])})
    gen_vars, student_vars = variables_of(state['generator']), variables_of(state['student'])
    seconds = _total_seconds(report, 'dafl', seconds)
    report['dafl'] = {'steps': dcfg.steps, 'seconds': seconds}
    report['generator'] = {'steps': dcfg.steps, 'seconds': seconds, 'trained_with': 'student'}
    add_diagnostics(gen_vars, dcfg.steps)
    student_steps = dcfg.steps
  else:
    state, step_fn = generator_setup(config, generator, teacher)
    state, seconds = _run_stage('generator', config, workdir, par, state,
                                {'teacher': teacher_vars}, step_fn, gcfg.steps, log,
                                report_every=config.image_every, report_fn=watch_generator)
    gen_vars = variables_of(state)
    report['generator'] = {'steps': gcfg.steps,
                           'seconds': _total_seconds(report, 'generator', seconds)}
    add_diagnostics(gen_vars, gcfg.steps)

    state, step_fn = student_setup(config, channels, generator, teacher, student)
    state, seconds = _run_stage('student', config, workdir, par, state,
                                {'teacher': teacher_vars, 'generator': gen_vars}, step_fn,
                                config.student.steps, log,
                                report_every=config.student.eval_every,
                                report_fn=test_accuracy_of)
    student_vars = variables_of(state)
    seconds = _total_seconds(report, 'student', seconds)
    student_steps = config.student.steps

  accuracy = evaluate(student, student_vars, test_images, test_labels,
                      config.eval_batch_size)
  agreement = generated_agreement(
      generator, gen_vars, teacher, teacher_vars, student, student_vars,
      gcfg.latent_dim, jax.random.fold_in(jax.random.key(config.seed), _STAGE_KEYS['fidelity']),
      num_samples=config.student.agreement_samples, **sampling(config))
  report['student'] = {'steps': student_steps, 'test_accuracy': accuracy,
                       'generated_agreement': agreement, 'seconds': seconds}
  write_json_atomic(report_path, report)
  _say(f'[student] test accuracy {accuracy:.4f}')

  if not parallel.is_main_process():
    return report
  from rdskd_jax import plot  # Matplotlib only when a run gets this far.
  plot.save_samples(os.path.join(workdir, 'samples.png'), generator, gen_vars, teacher,
                    teacher_vars, gcfg.latent_dim, config, samples_key(config))
  plot.save_curves(workdir)
  return report


class Run(NamedTuple):
  """A run's networks as restored from its workdir (see `load_run`)."""
  config: Any
  teacher: Any
  teacher_vars: Any
  generator: Any
  generator_vars: Any
  student: Any
  student_vars: Any  # None until the student stage has a checkpoint.


def load_run(workdir: str) -> Run:
  """The config (as run) and the trained networks of a workdir, from report.json and the
  latest checkpoints; for plots and notebooks. Raises RunStopped when the run has not
  got as far as a generator checkpoint."""
  import ml_collections
  report_path = os.path.join(workdir, 'report.json')
  if not os.path.exists(report_path) or 'dataset_fields' not in json.load(open(report_path)):
    raise RunStopped(f'{workdir!r} has no report.json of this version: run the job first')
  report = json.load(open(report_path))
  config = ml_collections.ConfigDict(with_fields_added_later(report['config']))
  fields = report['dataset_fields']
  teacher, generator, student = build_networks(config, fields['num_classes'], fields['channels'])
  source = config.teacher.checkpoint or os.path.join(workdir, 'teacher_variables')
  with config.unlocked():
    config.teacher.checkpoint = source
  teacher_vars = restore_teacher(config, teacher, fields['channels'])

  def latest(stage, template):
    manager = _checkpoint_manager(workdir, stage)
    step = manager.latest_step()
    return None if step is None else _restore_like(manager, step, template)

  if config.method == 'dafl':
    joint = latest('dafl', dafl_setup(config, fields['channels'], generator, teacher,
                                      student)[0])
    generator_state, student_state = (None, None) if joint is None else (
        joint['generator'], joint['student'])
  else:
    generator_state = latest('generator', generator_setup(config, generator, teacher)[0])
    student_state = latest('student', student_setup(config, fields['channels'], generator,
                                                    teacher, student)[0])
  if generator_state is None:
    raise RunStopped(f'{workdir!r} has no generator checkpoint yet')
  generator_vars = variables_of(generator_state)
  student_vars = None if student_state is None else variables_of(student_state)
  return Run(config, teacher, teacher_vars, generator, generator_vars, student, student_vars)
