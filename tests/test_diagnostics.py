"""Data-free diagnostics: known values on constructed inputs and on the real test split."""

import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax import data, diagnostics, models


def test_one_class_samples_have_zero_coverage_entropy_and_zero_smallest_share():
  coverage = diagnostics.class_coverage(np.full(100, 3), num_classes=10)
  assert coverage == {'coverage_entropy': 0.0, 'min_class_share': 0.0}


def test_even_classes_have_entropy_log_c():
  coverage = diagnostics.class_coverage(np.arange(1000) % 10, num_classes=10)
  np.testing.assert_allclose(coverage['coverage_entropy'], np.log(10), rtol=1e-12)
  assert coverage['min_class_share'] == 0.1


def test_intra_class_diversity():
  rng = np.random.default_rng(0)
  same = np.tile(rng.normal(size=(1, 5)), (6, 1))
  assert diagnostics.intra_class_diversity(same, np.zeros(6, int)) < 1e-6
  # Two classes, each two points at distance 3 and 5: the mean is 4.
  features = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
  np.testing.assert_allclose(
      diagnostics.intra_class_diversity(features, np.array([0, 0, 1, 1])), 4.0)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200_000, 3))
  b = 2.0 * rng.normal(size=(200_000, 3)) + np.array([1.0, 0.0, 0.0])
  # ||mu||^2 + tr(I + 4I - 2 * 2I) = 1 + 3 * (1 + 4 - 4) = 4.
  np.testing.assert_allclose(diagnostics.frechet_distance(a, b), 4.0, rtol=0.02)


def test_frechet_distance_of_the_test_split_to_itself_is_zero(smoke_config):
  images, _ = data.load_split(smoke_config, 'test')
  teacher = models.create_classifier('lenet5', 10)
  variables = teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  _, features = diagnostics.teacher_outputs(teacher, variables, images)
  assert features.shape == (10000, 120)
  assert diagnostics.frechet_distance(features, features) < 1e-6
  # A different half of the same split is close but not identical.
  assert 0 < diagnostics.frechet_distance(features[:5000], features[5000:]) < 1.0
