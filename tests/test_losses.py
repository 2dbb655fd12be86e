"""RDSKD losses against the golden values of the authors' formulas, plus properties."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdskd_jax import losses

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'rdskd_losses_golden.npz')
CASES = ('mnist_like', 'cifar_like', 'hundred_classes')


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(GOLDEN))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _values(golden, case, dtype):
  """Every loss and gradient of a case, computed as one compiled program (op by op, each
  operation would compile on its own, the slower way to the same values)."""
  g = lambda name: jnp.asarray(golden[f'{case}/{name}'], dtype)
  return jax.jit(_losses)(g('images'), g('teacher_logits'), g('student_logits'), g('prev'),
                          g('temperature'))


def _losses(x, t, s, prev, temperature):
  total = lambda x, t: losses.rdskd_generator_loss(x, t, prev[0], prev[1])[0]
  grad_x, grad_t = jax.grad(total, (0, 1))(x, t)
  kd = lambda s: losses.kd_loss(s, t, temperature)
  return {
      'one_hot': losses.one_hot_loss(t),
      'information_entropy': losses.information_entropy_loss(t),
      'diversity': losses.diversity_seeking_loss(x, t),
      'generator_total': total(x, t),
      'grad_images': grad_x,
      'grad_teacher_logits': grad_t,
      'kd': kd(s),
      'grad_student_logits': jax.grad(kd)(s),
  }


@pytest.mark.parametrize('case', CASES)
def test_golden_float64(golden, case):
  with jax.enable_x64(True):
    for name, value in _values(golden, case, jnp.float64).items():
      assert value.dtype == jnp.float64
      assert _rel(value, golden[f'{case}/{name}']) <= 1e-6, name


@pytest.mark.parametrize('case', CASES)
def test_golden_float32(golden, case):
  for name, value in _values(golden, case, jnp.float32).items():
    assert _rel(value, golden[f'{case}/{name}']) <= 1e-4, name


@pytest.mark.parametrize('classes', [2, 10, 100])
def test_information_entropy_of_uniform_prediction_is_minus_log_c(classes):
  logits = jnp.zeros((6, classes))
  np.testing.assert_allclose(losses.information_entropy_loss(logits), -np.log(classes), rtol=1e-6)


def test_information_entropy_of_one_class_batch_is_zero():
  logits = jnp.tile(jnp.array([[50.0, 0.0, 0.0]]), (4, 1))
  np.testing.assert_allclose(losses.information_entropy_loss(logits), 0.0, atol=1e-6)


def test_information_entropy_is_finite_when_a_class_probability_underflows():
  """A saturated teacher (seen with a 2-step CIFAR-10 ResNet-34) gives some classes a mean
  probability of exactly 0 in float32; the literal p ln p is then NaN."""
  logits = jnp.array([[200.0, 0.0, -200.0], [0.0, 200.0, -200.0]], jnp.float32)
  assert float(jax.nn.softmax(logits)[:, 2].max()) == 0.0
  value, grad = jax.value_and_grad(losses.information_entropy_loss)(logits)
  np.testing.assert_allclose(value, -np.log(2.0), rtol=1e-6)
  assert np.all(np.isfinite(grad))


def test_one_hot_loss_is_cross_entropy_against_argmax():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
  expected = np.mean([-jax.nn.log_softmax(logits[0])[0], -jax.nn.log_softmax(logits[1])[1]])
  np.testing.assert_allclose(losses.one_hot_loss(logits), expected, rtol=1e-6)
  assert float(losses.one_hot_loss(jnp.array([[100.0, 0.0]]))) < 1e-6


def test_diversity_is_symmetric_in_the_halves_and_falls_with_image_distance():
  key1, key2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key1, (8, 4, 4, 1))
  t = jax.random.normal(key2, (8, 10))
  swapped = lambda a: jnp.concatenate([a[4:], a[:4]])
  np.testing.assert_allclose(losses.diversity_seeking_loss(x, t),
                             losses.diversity_seeking_loss(swapped(x), swapped(t)), rtol=1e-6)
  spread = jnp.concatenate([x[:4], x[:4] + 2 * (x[4:] - x[:4])])
  assert losses.diversity_seeking_loss(spread, t) < losses.diversity_seeking_loss(x, t)


def test_generator_total_at_its_own_references_is_two_plus_diversity():
  x = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))
  t = jax.random.normal(jax.random.key(2), (6, 10))
  _, aux = losses.rdskd_generator_loss(x, t, 0.0, 0.0)
  total, _ = losses.rdskd_generator_loss(x, t, aux['one_hot'], aux['information_entropy'])
  np.testing.assert_allclose(total, 2.0 + aux['diversity'], rtol=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
  t = jax.random.normal(jax.random.key(3), (5, 10))
  assert abs(float(losses.kd_loss(t, t, 10.0))) < 1e-6
  assert float(losses.kd_loss(t + jax.random.normal(jax.random.key(4), t.shape), t, 10.0)) > 0
  assert not np.any(np.asarray(jax.grad(lambda t_: losses.kd_loss(t, t_, 4.0))(t + 1.0)))
