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


# ------------------------------------------------------------ DeepInversion and ZSKD


def _global_norm(x, axis_name: Optional[str]):
  """The Frobenius norm of `x` over the global batch (squares summed before the root)."""
  return jnp.sqrt(_global_sum(jnp.sum(jnp.square(x)), axis_name))


def total_variation(images, *, axis_name: Optional[str] = None):
  """DeepInversion's total-variation prior (Yin et al., CVPR 2020, Eq. 3's R_TV; the
  `loss_var` of the authors' cifar10/deepinversion_cifar10.py): the sum of the Frobenius
  norms, over the batch, of the differences of neighbouring pixels along the width, the
  height and the two diagonals,

    R_TV = ||x[:, :, 1:] - x[:, :, :-1]|| + ||x[:, 1:] - x[:, :-1]||
           + ||x[:, 1:, :-1] - x[:, :-1, 1:]|| + ||x[:, 1:, 1:] - x[:, :-1, :-1]||,

  for images (N, H, W, C). Not a mean: like the authors' term, it grows with the batch.
  """
  diffs = (images[:, :, 1:] - images[:, :, :-1], images[:, 1:] - images[:, :-1],
           images[:, 1:, :-1] - images[:, :-1, 1:], images[:, 1:, 1:] - images[:, :-1, :-1])
  return sum(_global_norm(d, axis_name) for d in diffs)


def image_l2(images, *, axis_name: Optional[str] = None):
  """DeepInversion's L2 prior R_l2 = ||x||, the Frobenius norm of the whole batch."""
  return _global_norm(images, axis_name)


def competition_loss(student_logits, teacher_logits, temperature, *,
                     axis_name: Optional[str] = None):
  """Adaptive DeepInversion's competition term (Yin et al. 2020, Eq. 8; the authors'
  `loss_verifier_cig`): 1 - JS, the Jensen-Shannon divergence of teacher and student
  predictions at `temperature` (3 in the authors' code) clipped to [0, 1],

    p = clip(softmax(s / T)), q = clip(softmax(t / T)), m = clip((p' + q') / 2),
    JS = 1/N sum_n [KL(m_n || p_n) + KL(m_n || q_n)] / 2,

  where p' and q' are the unclipped predictions, and every clip is to [0.01, 0.99] as in
  the authors' code (it bounds the logarithms). Minimised over the images, it seeks inputs
  on which the student disagrees with the teacher; the student itself is not trained by
  it (the caller stops its gradient).
  """
  p_raw = jax.nn.softmax(student_logits / temperature, axis=-1)
  q_raw = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  clip = lambda x: jnp.clip(x, 0.01, 0.99)
  p, q, m = clip(p_raw), clip(q_raw), clip((p_raw + q_raw) / 2)
  kl = lambda a, b: jnp.sum(a * (jnp.log(a) - jnp.log(b)), axis=-1)
  js = global_mean((kl(m, p) + kl(m, q)) / 2, axis_name)
  return 1.0 - jnp.clip(js, 0.0, 1.0)


def class_similarity(final_weights):
  """ZSKD's class similarity matrix (Nayak et al., ICML 2019, Sec. 3.1; the authors'
  di_generation/dirichmat.py): the cosine similarities of the columns of the teacher's
  final layer weights (features F, classes K) as a (K, K) matrix, min-max normalised over
  the whole matrix to [0, 1]:

    w_k = W[:, k] / ||W[:, k]||,  S_ij = w_i . w_j,  C = (S - min S) / (max S - min S).
  """
  w = final_weights / jnp.linalg.norm(final_weights, axis=0, keepdims=True)
  similarity = w.T @ w
  return (similarity - similarity.min()) / (similarity.max() - similarity.min())


def dirichlet_concentration(similarity_row, beta):
  """ZSKD's Dirichlet concentration for the soft targets of one class k: its row of the
  class similarity matrix, min-max normalised to [0, 1] (so the class itself weighs 1),
  times the scale beta (the paper's 1.0 and 0.1), plus the authors' floor of 1e-4, which
  keeps every concentration positive:  alpha = beta (c - min c) / (max c - min c) + 1e-4.

  The authors' script normalises each row again after scaling the matrix, which undoes a
  scale of 0.1; here beta applies after the row's normalisation, as the paper states.
  """
  low, high = similarity_row.min(), similarity_row.max()
  return beta * (similarity_row - low) / (high - low) + 1e-4


def soft_target_cross_entropy(logits, targets, temperature, *,
                              axis_name: Optional[str] = None):
  """ZSKD's data-impression objective (Nayak et al. 2019, Eq. 3; the authors'
  `softmax_cross_entropy_with_logits_v2` on the logits over 20): the cross-entropy of
  the teacher's prediction at `temperature` against a soft target y, mean over the batch,

    L = -1/N sum_n sum_k y_nk log softmax(z_n / T)_k.
  """
  log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
  return global_mean(-jnp.sum(targets * log_probs, axis=-1), axis_name)
