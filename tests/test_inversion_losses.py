"""DeepInversion's and ZSKD's losses against values computed by hand, pixel by pixel and
class by class in NumPy float64, and their data-parallel forms against one device."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdskd_jax import losses


def _images(seed=0, shape=(4, 5, 6, 2)):
  return np.random.default_rng(seed).normal(size=shape)


def _tv_by_hand(x):
  n, h, w, c = x.shape
  sums = [0.0, 0.0, 0.0, 0.0]
  for b in range(n):
    for i in range(h):
      for j in range(w):
        for k in range(c):
          if j + 1 < w:
            sums[0] += (x[b, i, j + 1, k] - x[b, i, j, k]) ** 2
          if i + 1 < h:
            sums[1] += (x[b, i + 1, j, k] - x[b, i, j, k]) ** 2
          if i + 1 < h and j + 1 < w:
            sums[2] += (x[b, i + 1, j, k] - x[b, i, j + 1, k]) ** 2
            sums[3] += (x[b, i + 1, j + 1, k] - x[b, i, j, k]) ** 2
  return sum(math.sqrt(s) for s in sums)


def test_total_variation_and_l2_prior_by_hand():
  x = _images()
  with jax.enable_x64(True):
    assert float(losses.total_variation(jnp.asarray(x))) == pytest.approx(_tv_by_hand(x),
                                                                          rel=1e-12)
    assert float(losses.image_l2(jnp.asarray(x))) == pytest.approx(
        math.sqrt(sum(v * v for v in x.ravel())), rel=1e-12)
  flat = np.ones((2, 3, 3, 1))
  assert float(losses.total_variation(jnp.asarray(flat))) == 0.0


def _softmax(z):
  e = [math.exp(v - max(z)) for v in z]
  return [v / sum(e) for v in e]


def test_competition_loss_by_hand():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(3, 4)) * 3, rng.normal(size=(3, 4)) * 3
  clip = lambda v: min(max(v, 0.01), 0.99)
  js = 0.0
  for n in range(3):
    p, q = _softmax(list(s[n] / 3.0)), _softmax(list(t[n] / 3.0))
    m = [clip((a + b) / 2) for a, b in zip(p, q)]
    p, q = [clip(v) for v in p], [clip(v) for v in q]
    js += 0.5 * sum(mi * (math.log(mi) - math.log(pi)) for mi, pi in zip(m, p))
    js += 0.5 * sum(mi * (math.log(mi) - math.log(qi)) for mi, qi in zip(m, q))
  js /= 3
  with jax.enable_x64(True):
    got = losses.competition_loss(jnp.asarray(s), jnp.asarray(t), 3.0)
    assert float(got) == pytest.approx(1.0 - min(max(js, 0.0), 1.0), rel=1e-12)
    same = losses.competition_loss(jnp.asarray(t), jnp.asarray(t), 3.0)
    assert float(same) == pytest.approx(1.0, abs=1e-12)  # Agreement: no divergence.


def test_class_similarity_and_dirichlet_concentration_by_hand():
  w = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])  # 2 features, 3 classes.
  cos = np.array([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)],
                  [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]])
  with jax.enable_x64(True):
    c = np.asarray(losses.class_similarity(jnp.asarray(w)))
    np.testing.assert_allclose(c, cos, rtol=1e-12, atol=1e-12)  # Already spans [0, 1].
    w2 = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])  # Cosines -1, 0, 1: to 0, 0.5, 1.
    np.testing.assert_allclose(np.asarray(losses.class_similarity(jnp.asarray(w2))),
                               [[1, 0, 0.5], [0, 1, 0.5], [0.5, 0.5, 1]], atol=1e-12)
    row = jnp.asarray([0.2, 1.0, 0.6])
    np.testing.assert_allclose(np.asarray(losses.dirichlet_concentration(row, 0.1)),
                               [1e-4, 0.1 + 1e-4, 0.05 + 1e-4], rtol=1e-12)


def test_soft_target_cross_entropy_by_hand():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(2, 3)) * 10
  y = rng.dirichlet(np.ones(3), size=2)
  want = 0.0
  for n in range(2):
    p = _softmax(list(z[n] / 20.0))
    want -= sum(y[n, k] * math.log(p[k]) for k in range(3))
  with jax.enable_x64(True):
    got = losses.soft_target_cross_entropy(jnp.asarray(z), jnp.asarray(y), 20.0)
    assert float(got) == pytest.approx(want / 2, rel=1e-12)


def test_sharded_forms_equal_one_device():
  """Over 4 shards of a batch, each loss equals its value on the whole batch."""
  x = _images(3, (8, 5, 5, 1))
  rng = np.random.default_rng(4)
  s, t = rng.normal(size=(8, 10)), rng.normal(size=(8, 10))
  y = rng.dirichlet(np.ones(10), size=8)

  def all_losses(x, s, t, y, axis_name=None):
    return jnp.stack([losses.total_variation(x, axis_name=axis_name),
                      losses.image_l2(x, axis_name=axis_name),
                      losses.competition_loss(s, t, 3.0, axis_name=axis_name),
                      losses.soft_target_cross_entropy(s, y, 20.0, axis_name=axis_name)])

  with jax.enable_x64(True):
    whole = all_losses(*map(jnp.asarray, (x, s, t, y)))
    shard = lambda a: jnp.asarray(a).reshape(4, -1, *a.shape[1:])
    sharded = jax.vmap(functools.partial(all_losses, axis_name='d'), axis_name='d')(
        *map(shard, (x, s, t, y)))
    for row in np.asarray(sharded):
      np.testing.assert_allclose(row, np.asarray(whole), rtol=1e-12)
