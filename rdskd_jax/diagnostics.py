"""Data-free diagnostics of a generator, measured with the teacher alone.

A generator that collapses to a few classes still lowers its loss, so a run reports what
its samples look like to the teacher, on a fixed set of generated samples:

- class coverage: the entropy (nats) of the teacher's predicted-class histogram, at most
  ln C when every class is equally frequent and 0 when one class takes all samples, and
  the smallest class share;
- teacher confidence: the mean top-1 softmax probability;
- intra-class diversity: the mean pairwise Euclidean distance between the teacher's
  penultimate features of samples predicted as the same class, averaged over classes
  with at least two samples (0 for a generator that repeats one image per class);
- Frechet distance between Gaussian fits of the teacher's penultimate features of the
  generated samples and of the real test split (FID's formula with the teacher in place
  of Inception). It is computed for reporting only, after the generator has trained;
  nothing reads it back.

The functions on arrays are pure numpy (float64); `generator_diagnostics` draws the
samples and runs the networks.
"""

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax import evaluation, models


def class_coverage(predicted: np.ndarray, num_classes: int) -> Dict[str, float]:
  """Entropy (nats) of the predicted-class histogram and the smallest class share."""
  shares = np.bincount(np.asarray(predicted), minlength=num_classes) / len(predicted)
  nonzero = shares[shares > 0]
  return {'coverage_entropy': float(-np.sum(nonzero * np.log(nonzero))) + 0.0,
          'min_class_share': float(shares.min())}


def intra_class_diversity(features: np.ndarray, predicted: np.ndarray) -> float:
  """Mean pairwise distance of features within each predicted class, averaged over the
  classes that have at least two samples (0 when none has)."""
  features = np.asarray(features, np.float64)
  means = []
  for c in np.unique(predicted):
    members = features[predicted == c]
    n = len(members)
    if n < 2:
      continue
    sq = np.sum(members**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * members @ members.T, 0.0)
    means.append(np.sqrt(d2)[np.triu_indices(n, k=1)].mean())
  return float(np.mean(means)) if means else 0.0


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of Gaussian fits.

  The trace of the matrix square root is taken from the eigenvalues of the symmetric
  S_a^1/2 S_b S_a^1/2, which equals tr((S_a S_b)^1/2) and stays real.
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root_a = _psd_sqrt(cov_a)
  cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_root = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
  value = np.sum((mu_a - mu_b)**2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
  return float(max(value, 0.0))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_probs_and_features(teacher, teacher_vars, images):
  logits, features = teacher.apply(teacher_vars, images, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32)), features.astype(jnp.float32)


def teacher_outputs(teacher, teacher_vars, images, batch_size: int = 500):
  """(softmax probabilities, penultimate features) of the teacher in inference mode."""
  return evaluation.in_batches(
      lambda x: _teacher_probs_and_features(teacher, teacher_vars, x), images, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(generator, generator_vars, z, batchnorm):
  return models.generate(generator, generator_vars, z, batchnorm)


def generated_images(generator, generator_vars, latent_dim: int, key, num_samples: int,
                     batch_size: int = 500, batchnorm: str = 'running'):
  """`num_samples` images of the generator from noise drawn from `key`, `batch_size` at a
  time, its BatchNorm in `batchnorm` mode (models.generate)."""
  z = np.asarray(jax.random.normal(key, (num_samples, latent_dim)))
  generate = lambda noise: _generate(generator, generator_vars, noise, batchnorm)
  if batchnorm == 'running':  # Each sample its own: a padded last batch changes none.
    return evaluation.in_batches(generate, z, batch_size)
  return np.concatenate([np.asarray(generate(z[i:i + batch_size]))
                         for i in range(0, num_samples, batch_size)])


def sample_statistics(probs: np.ndarray, features: np.ndarray) -> Dict[str, float]:
  """Coverage, confidence and intra-class diversity of samples seen by the teacher."""
  predicted = probs.argmax(-1)
  return {**class_coverage(predicted, probs.shape[-1]),
          'teacher_confidence': float(probs.max(-1).mean()),
          'intra_class_diversity': intra_class_diversity(features, predicted)}


def generator_diagnostics(generator, generator_vars, teacher, teacher_vars, latent_dim: int,
                          key, num_samples: int, test_images=None, batch_size: int = 500,
                          batchnorm: str = 'running') -> Dict[str, float]:
  """All diagnostics on `num_samples` fixed generated samples (drawn as generated_images
  draws them); the Frechet distance to the real test split's features when `test_images`
  is given."""
  images = generated_images(generator, generator_vars, latent_dim, key, num_samples,
                            batch_size, batchnorm)
  return image_diagnostics(images, teacher, teacher_vars, test_images)


def image_diagnostics(images, teacher, teacher_vars, test_images=None) -> Dict[str, float]:
  """All diagnostics on `images` (generated, or a synthesised set); the Frechet distance
  to the real test split's features when `test_images` is given."""
  probs, features = teacher_outputs(teacher, teacher_vars, images)
  result = {'samples': len(images), **sample_statistics(probs, features)}
  if test_images is not None:
    _, real_features = teacher_outputs(teacher, teacher_vars, test_images)
    result['frechet_distance_to_test'] = frechet_distance(features, real_features)
  return result
