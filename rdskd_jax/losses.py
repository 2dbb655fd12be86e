"""RDSKD losses as pure functions of arrays.

Sources: Han, Park, Wang, Liu, "Robustness and Diversity Seeking Data-Free Knowledge
Distillation" (ICASSP 2021, arXiv 2011.03749), and the formulas of the authors' PyTorch
code (generator-train.py and utils.kdloss), which fix the details the paper leaves open.

Every batch reduction takes an optional `axis_name`. With it, the reduction runs over the
global batch of a data-parallel step (sums are `psum`-ed before they are divided or
square-rooted), so a step on N devices computes the same numbers as one device on the
whole batch. Without it, the local batch is the whole batch.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# The authors' guard against a zero image distance in the inter-sample diversity loss.
DIVERSITY_EPS = 1e-20


def _global_sum(x, axis_name: Optional[str]):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def global_mean(x, axis_name: Optional[str], axis: int = 0):
  """Mean over `axis` of the global batch (every device holds an equal share)."""
  local = jnp.mean(x, axis=axis)
  return local if axis_name is None else jax.lax.pmean(local, axis_name)


def one_hot_loss(teacher_logits, *, axis_name: Optional[str] = None):
  """Authenticity loss L_oh: cross-entropy of the logits against their own argmax.

  L_oh = -mean_i log softmax(t_i)[argmax_k t_ik]  (the paper's Eq. 2; DAFL's L_oh).
  The argmax target carries no gradient.
  """
  log_probs = jax.nn.log_softmax(teacher_logits, axis=-1)
  per_sample = -jnp.max(log_probs, axis=-1)  # log-softmax is largest at the argmax.
  return global_mean(per_sample, axis_name)


def information_entropy_loss(teacher_logits, *, axis_name: Optional[str] = None):
  """Class-diversity loss L_ie = sum_k pbar_k ln pbar_k, pbar = batch mean of softmax(t).

  The negative entropy of the batch's mean prediction: lowest (-ln C) when the batch
  covers all C classes evenly. Natural log as in RDSKD (DAFL used log10).

  A class whose mean probability underflows to 0 (a saturated teacher) contributes its
  limit 0 ln 0 = 0, with zero gradient, where the literal formula gives NaN.
  """
  mean_probs = global_mean(jax.nn.softmax(teacher_logits, axis=-1), axis_name)
  positive = mean_probs > 0
  safe = jnp.where(positive, mean_probs, 1.0)  # No log(0) even in the unselected branch.
  return jnp.sum(jnp.where(positive, mean_probs * jnp.log(safe), 0.0))


def diversity_seeking_loss(images, teacher_logits, *, axis_name: Optional[str] = None):
  """Inter-sample diversity loss L_ds = 1 / (lz + 1e-20).

  lz = ||x[h:] - x[:h]|| / ||softmax(t)[h:] - softmax(t)[:h]||, h = half the batch, both
  Frobenius norms over the whole half-batch difference (the paper's mode-seeking term,
  as in the authors' code). Under data parallelism every device holds matching slices of
  the two halves, so the squared norms are summed across devices before the square root.
  """
  half = images.shape[0] // 2
  probs = jax.nn.softmax(teacher_logits, axis=-1)
  image_sq = _global_sum(jnp.sum(jnp.square(images[half:] - images[:half])), axis_name)
  prob_sq = _global_sum(jnp.sum(jnp.square(probs[half:] - probs[:half])), axis_name)
  lz = jnp.sqrt(image_sq) / jnp.sqrt(prob_sq)
  return 1.0 / (lz + DIVERSITY_EPS)


def rdskd_generator_loss(images, teacher_logits, ref_one_hot, ref_entropy, *,
                         axis_name: Optional[str] = None):
  """RDSKD generator objective and its parts.

  L_G = exp(L_oh - ref_oh) + exp(L_ie - ref_ie) + L_ds, where the references are
  earlier values of L_oh and L_ie (stop-gradient): the exponential penalises each loss
  for rising above its reference, which keeps authenticity and class diversity from
  undoing each other (the paper's Eq. 6, the authors' generator-train.py).

  Returns (total, aux) with aux = {'one_hot', 'information_entropy', 'diversity'}.
  """
  l_oh = one_hot_loss(teacher_logits, axis_name=axis_name)
  l_ie = information_entropy_loss(teacher_logits, axis_name=axis_name)
  l_ds = diversity_seeking_loss(images, teacher_logits, axis_name=axis_name)
  ref_one_hot = jax.lax.stop_gradient(ref_one_hot)
  ref_entropy = jax.lax.stop_gradient(ref_entropy)
  total = jnp.exp(l_oh - ref_one_hot) + jnp.exp(l_ie - ref_entropy) + l_ds
  return total, {'one_hot': l_oh, 'information_entropy': l_ie, 'diversity': l_ds}


def kd_loss(student_logits, teacher_logits, temperature, *,
            axis_name: Optional[str] = None):
  """Distillation loss T^2 * KL(softmax(t/T) || softmax(s/T)).

  Summed over classes, mean over the batch (Hinton et al.; the authors' utils.kdloss).
  The teacher side carries no gradient.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  per_sample = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature**2 * global_mean(per_sample, axis_name)


def cross_entropy_loss(logits, labels, *, axis_name: Optional[str] = None):
  """Mean cross-entropy against integer labels (teacher training on real data)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_sample = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return global_mean(per_sample, axis_name)


# ------------------------------------------------------------------ DAFL and BN prior


def activation_loss(teacher_features, *, axis_name: Optional[str] = None):
  """DAFL's activation loss L_a = -mean |f| over the batch and the teacher's features f
  before its fully connected layers (real images excite those features strongly)."""
  per_sample = jnp.mean(jnp.abs(teacher_features), axis=-1)
  return -global_mean(per_sample, axis_name)


def dafl_generator_loss(teacher_logits, teacher_features, alpha, beta, *,
                        axis_name: Optional[str] = None):
  """DAFL generator objective L_oh + alpha L_a + beta L_ie10 (Chen et al., ICCV 2019).

  L_ie10 is the information entropy loss in DAFL's base-10 logarithm: L_ie / ln 10.
  Returns (total, aux) with aux = {'one_hot', 'activation', 'information_entropy'}
  (the last in log10, as DAFL logs it).
  """
  l_oh = one_hot_loss(teacher_logits, axis_name=axis_name)
  l_a = activation_loss(teacher_features, axis_name=axis_name)
  l_ie10 = information_entropy_loss(teacher_logits, axis_name=axis_name) / jnp.log(10.0)
  total = l_oh + alpha * l_a + beta * l_ie10
  return total, {'one_hot': l_oh, 'activation': l_a, 'information_entropy': l_ie10}


def logit_discrepancy(student_logits, teacher_logits, *, axis_name: Optional[str] = None):
  """DFAD's model discrepancy (Fang et al. 2019, "Data-Free Adversarial Distillation",
  Eq. 4; the authors' `F.l1_loss` in DFAD_mnist.py): the mean absolute difference of
  student and teacher logits, over the batch and the classes,

    D = 1 / (N C) sum_n sum_c |s_nc - t_nc|.

  The student minimises D, the generator maximises it (its loss is -D). Gradient flows to
  both sides; the caller stops what it does not train.
  """
  per_sample = jnp.mean(jnp.abs(student_logits - teacher_logits), axis=-1)
  return global_mean(per_sample, axis_name)


def bn_statistics_loss(batch_means, batch_vars, running_means, running_vars):
  """DeepInversion's BatchNorm prior: sum over BatchNorm layers l of
  ||mu_l(batch) - mu_l(running)||_2 + ||var_l(batch) - var_l(running)||_2, where the
  batch statistics are those of the layer's input on generated images (biased variance,
  as BatchNorm computes it) and the running ones the teacher's stored statistics.
  Arguments are sequences with one per-channel vector per layer."""
  terms = [jnp.linalg.norm(bm - rm) + jnp.linalg.norm(bv - rv)
           for bm, bv, rm, rv in zip(batch_means, batch_vars, running_means, running_vars)]
  return jnp.sum(jnp.stack(terms))
