"""Evaluation, agreement and diagnostics compile once: new variables are arguments, not
constants baked into a new program."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import mnist
from rdskd_jax import diagnostics, evaluation, stages, train_steps
from rdskd_jax.methods import rdskd


def _perturbed(variables, scale):
  return jax.tree.map(lambda x: x * (1 + scale), variables)


def _networks():
  config = mnist.get_config('tiny')
  teacher, generator, student = stages.build_networks(config, 10, 1)
  gen_vars = train_steps.variables_of(rdskd.generator_setup(config, generator, teacher)[0])
  teacher_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  student_vars = student.init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
  return config, teacher, teacher_vars, generator, gen_vars, student, student_vars


def test_measures_compile_once_for_new_variables():
  config, teacher, teacher_vars, generator, gen_vars, student, student_vars = _networks()
  images = np.random.default_rng(0).normal(size=(64, 32, 32, 1)).astype(np.float32)
  labels = np.zeros(64, np.int32)
  key = jax.random.key(3)
  latent = config.generator.latent_dim

  def measure_all(scale):
    t, g, s = (_perturbed(v, scale) for v in (teacher_vars, gen_vars, student_vars))
    evaluation.evaluate(student, s, images, labels, batch_size=32)
    evaluation.generated_agreement(generator, g, teacher, t, student, s, latent, key,
                                   num_samples=64, batch_size=32)
    diagnostics.generator_diagnostics(generator, g, teacher, t, latent, key, 64,
                                      test_images=images, batch_size=32)

  jitted = (evaluation.predict, evaluation.agreements, diagnostics._generate,
            diagnostics._teacher_probs_and_features)
  measure_all(0.0)
  after_first = [f._cache_size() for f in jitted]
  measure_all(0.01)
  measure_all(0.02)
  assert [f._cache_size() for f in jitted] == after_first


def test_in_batches_compiles_one_shape_and_trims_the_padding():
  shapes = []

  @jax.jit
  def double(x):
    shapes.append(x.shape)  # Runs once per traced shape.
    return {'twice': 2 * x, 'sum': x.sum(-1)}

  x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
  out = evaluation.in_batches(double, x, 10)
  np.testing.assert_array_equal(out['twice'], 2 * x)
  np.testing.assert_array_equal(out['sum'], x.sum(-1))
  assert shapes == [(10, 3)]
  assert evaluation.in_batches(double, x[:4], 10)['twice'].shape == (4, 3)  # One short batch.
