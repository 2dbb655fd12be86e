"""Measures of trained networks: test accuracy (reporting only) and agreement with the
teacher on generated samples (data-free).

Each measure is one jitted function of the networks' variables, with the modules static:
a run compiles it once per shape and reuses it for every evaluation, with new variables
as arguments.
"""

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rdskd_jax import models


def in_batches(fn, inputs, batch_size: int):
  """`fn` (arrays in, a pytree of arrays out, each row its input's alone) over `inputs`,
  `batch_size` rows at a time, outputs concatenated as numpy arrays. A short last batch is
  padded to the full size and its outputs trimmed, so a jitted `fn` compiles one shape."""
  outputs = []
  for i in range(0, len(inputs), batch_size):
    chunk = inputs[i:i + batch_size]
    rows = len(chunk)
    if i and rows < batch_size:
      chunk = np.concatenate([np.asarray(chunk),
                              np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
    outputs.append(jax.tree.map(lambda a: np.asarray(a)[:rows], fn(chunk)))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


@functools.partial(jax.jit, static_argnums=0)
def predict(model, variables, images):
  """Top-1 classes of a classifier in inference mode."""
  return jnp.argmax(model.apply(variables, images, train=False)[0], -1)


def evaluate(model, variables, images, labels, batch_size: int) -> float:
  """Top-1 accuracy of a classifier in inference mode, on (images, labels) of every
  process together (each process holds its own share of the split)."""
  predicted = in_batches(lambda x: predict(model, variables, x), images, batch_size)
  counts = np.array([np.sum(predicted == np.asarray(labels)), len(images)], np.int64)
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


@functools.partial(jax.jit, static_argnames=('generator', 'teacher', 'student', 'batchnorm'))
def agreements(generator_vars, teacher_vars, student_vars, z, *, generator, teacher, student,
               batchnorm):
  """How many samples of noise `z` student and teacher classify alike (top-1)."""
  images = models.generate(generator, generator_vars, z, batchnorm)
  t = teacher.apply(teacher_vars, images, train=False)[0]
  s = student.apply(student_vars, images, train=False)[0]
  return jnp.sum(jnp.argmax(t, -1) == jnp.argmax(s, -1))


def generated_agreement(generator, generator_vars, teacher, teacher_vars, student,
                        student_vars, latent_dim, key, num_samples=4096, batch_size=512,
                        batchnorm='running'):
  """Share of fresh generated samples on which student and teacher agree (top-1).

  A data-free measure of how well the student imitates the teacher, on samples it never
  trained on; unlike test accuracy it may guide choices of settings. Samples are drawn
  `batch_size` at a time, the generator's BatchNorm in `batchnorm` mode (models.generate).
  """
  total = 0
  batch_size = min(batch_size, num_samples)
  for i in range(num_samples // batch_size):
    z = jax.random.normal(jax.random.fold_in(key, i), (batch_size, latent_dim))
    total += int(agreements(generator_vars, teacher_vars, student_vars, z, generator=generator,
                            teacher=teacher, student=student, batchnorm=batchnorm))
  return total / (num_samples // batch_size * batch_size)


def image_agreement(teacher, teacher_vars, student, student_vars, images,
                    batch_size: int = 512) -> float:
  """Share of `images` on which student and teacher agree (top-1): for methods without a
  generator, on their synthesised set."""
  t = in_batches(lambda x: predict(teacher, teacher_vars, x), images, batch_size)
  s = in_batches(lambda x: predict(student, student_vars, x), images, batch_size)
  return float(np.mean(t == s))
