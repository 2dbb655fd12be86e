"""Model shapes, parameter counts, and the exactness of the sub-pixel generator."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10, svhn
from rdskd_jax import models, stages, train_steps
from rdskd_jax.methods import rdskd


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name, params', [('lenet5', 61706), ('lenet5_half', 15738)])
def test_lenet_parameter_counts_and_outputs(name, params):
  model = models.create_classifier(name, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  assert _count(variables) == params
  logits, features = model.apply(variables, jnp.zeros((3, 32, 32, 1)))
  assert logits.shape == (3, 10)
  assert features.shape == (3, {'lenet5': 120, 'lenet5_half': 60}[name])  # conv3's outputs


def test_lenets_max_pool_is_flaxs_with_its_gradient():
  """The reshape form of LeNet-5's 2x2 pooling gives flax's windowed maxima and, where
  every window has one maximum, the same gradient, bit for bit."""
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 6))
  windowed = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(models.max_pool_2x2(x), windowed(x))
  weights = jax.random.normal(jax.random.key(1), (3, 14, 14, 6))
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
  np.testing.assert_array_equal(grad(models.max_pool_2x2), grad(windowed))
  assert np.count_nonzero(grad(models.max_pool_2x2)) == weights.size  # One per window.


@pytest.mark.parametrize('name, width, shapes', [
    ('lenet5', 1.0, [(2, 14, 14, 6), (2, 5, 5, 16)]),
    ('wrn_16_1', 0.125, [(2, 32, 32, 2), (2, 16, 16, 4), (2, 8, 8, 8)]),
    ('resnet18', 0.125, [(2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)])])
def test_attention_maps_come_with_the_same_forward_pass(name, width, shapes):
  # MSKD's attention term reads each pooled conv (LeNet-5) or residual group's output.
  model = models.create_classifier(name, 10, width=width)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 1 if 'lenet' in name else 3))
  variables = model.init(jax.random.key(0), images)
  (logits, _), maps, updates = models.with_attention(model, variables, images, train=True)
  assert [m.shape for m in maps] == shapes
  assert set(updates) == ({'batch_stats'} if 'batch_stats' in variables else set())
  plain, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(logits, plain[0])  # Marking changes nothing computed.


def test_unknown_model_names_the_known_ones():
  with pytest.raises(ValueError, match="unknown model 'lenet7'.*lenet5, lenet5_half"):
    models.create_classifier('lenet7', 10)


@pytest.mark.parametrize('channels', [1, 3])
def test_generator_output_shape_and_modes(channels):
  generator = models.Generator(image_size=32, channels=channels)
  variables = generator.init(jax.random.key(0), jnp.zeros((2, 100)))
  z = jax.random.normal(jax.random.key(1), (4, 100))
  images, updates = generator.apply(variables, z, train=True, mutable=['batch_stats'])
  assert images.shape == (4, 32, 32, channels)
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates['batch_stats'],
                                       variables['batch_stats']))
  assert generator.apply(variables, z, train=False).shape == (4, 32, 32, channels)


def test_generate_modes_leave_the_variables_alone():
  generator = models.Generator()
  variables = generator.init(jax.random.key(0), jnp.zeros((2, 100)))
  variables['batch_stats'] = jax.tree.map(lambda v: v + 1.0, variables['batch_stats'])
  z = jax.random.normal(jax.random.key(1), (8, 100))
  running = models.generate(generator, variables, z)
  batch = models.generate(generator, variables, z, 'batch')
  np.testing.assert_array_equal(running, generator.apply(variables, z, train=False))
  np.testing.assert_array_equal(
      batch, generator.apply(variables, z, train=True, mutable=['batch_stats'])[0])
  assert not np.allclose(running, batch, atol=1e-2)
  # The final BatchNorm has no scale or bias: in 'batch' mode each channel has mean 0.
  np.testing.assert_allclose(np.mean(batch, axis=(0, 1, 2)), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="batchnorm='train'; expected one of"):
    models.generate(generator, variables, z, 'train')


def test_subpixel_generator_equals_literal_upsample_conv_in_float64():
  with jax.enable_x64(True):
    literal = models.Generator(subpixel=False)
    fast = models.Generator(subpixel=True)
    variables = jax.tree.map(lambda x: x.astype(jnp.float64),
                             literal.init(jax.random.key(0), jnp.zeros((2, 100))))
    z = jax.random.normal(jax.random.key(1), (6, 100), jnp.float64)

    def objective(module):
      def f(params):
        images, _ = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 z, train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(3 * images)), images
      return jax.jit(jax.value_and_grad(f, has_aux=True))(variables['params'])

    (_, images_a), grads_a = objective(literal)
    (_, images_b), grads_b = objective(fast)
    np.testing.assert_allclose(images_a, images_b, rtol=0, atol=1e-10)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a))
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize('shape, features', [((4, 32, 32, 1), 6), ((4, 14, 14, 3), 8)])
def test_lenets_row_band_conv_equals_a_valid_conv_in_float64(shape, features):
  """LeNet-5's 5x5 convs (convs.RowBandConv): flax's 'VALID' nn.Conv on the same
  parameters, values and gradients (input and parameters), and the same initialisation."""
  from rdskd_jax import convs
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    inits = dict(kernel_init=convs.torch_kernel_init, bias_init=convs.torch_bias_init(25))
    band = convs.RowBandConv(features, **inits)
    literal = nn.Conv(features, (5, 5), padding='VALID', **inits)
    params = band.init(jax.random.key(1), x)['params']
    jax.tree.map(np.testing.assert_array_equal, params,
                 literal.init(jax.random.key(1), x)['params'])

    def objective(module):
      f = lambda params, x: jnp.sum(jnp.sin(3 * module.apply({'params': params}, x)))
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    (value_a, grads_a), (value_b, grads_b) = objective(literal), objective(band)
    np.testing.assert_allclose(value_b, value_a, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize('subpixel', [True, False])
def test_generator_initial_parameters_do_not_depend_on_x64(subpixel):
  """The same float32 parameters with and without jax_enable_x64: float64 runs (tests, the
  float64 reference) start where float32 runs start."""
  z = jnp.zeros((2, 100), jnp.float32)
  plain = models.Generator(subpixel=subpixel).init(jax.random.key(0), z)
  with jax.enable_x64(True):
    wide = models.Generator(subpixel=subpixel, dtype=jnp.float64).init(
        jax.random.key(0), z.astype(jnp.float64))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(wide)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  """config.dtype='bfloat16': the same function to bf16 rounding, float32 where it matters."""
  z = jax.random.normal(jax.random.key(1), (8, 100))
  f32, bf16 = models.Generator(), models.Generator(dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(0), z)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype == jnp.float32,
                                   variables, bf16.init(jax.random.key(0), z)))
  images, images_bf16 = (g.apply(variables, z, train=False) for g in (f32, bf16))
  assert images_bf16.dtype == jnp.float32
  assert 0 < jnp.linalg.norm(images_bf16 - images) / jnp.linalg.norm(images) < 3e-2
  teacher, teacher_bf16 = (models.create_classifier('lenet5', 10, d) for d in (None, jnp.bfloat16))
  teacher_vars = teacher.init(jax.random.key(2), images)
  (logits, features), (logits_bf16, _) = (t.apply(teacher_vars, images) for t in
                                          (teacher, teacher_bf16))
  assert logits_bf16.dtype == features.dtype == jnp.float32
  assert 0 < jnp.linalg.norm(logits_bf16 - logits) / jnp.linalg.norm(logits) < 3e-2


@pytest.mark.parametrize('name', ['lenet5', 'wrn_10_1'])
def test_float64_compute_returns_float64_for_float32_images(name):
  """config.dtype='float64' on dataset images (float32): nothing rounded back to float32,
  or the teacher's loss and gradients would carry float32 rounding (which differs
  between device splits of the batch and which Adam's first steps amplify)."""
  with jax.enable_x64(True):
    model = models.create_classifier(name, 10, jnp.float64)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 1), jnp.float32)
    variables = model.init(jax.random.key(1), images)
    logits, features = model.apply(variables, images)
    assert logits.dtype == features.dtype == jnp.float64
    expected = model.apply(variables, images.astype(jnp.float64))[0]
    np.testing.assert_array_equal(logits, expected)
    z = jax.random.normal(jax.random.key(2), (2, 100), jnp.float32)
    generator = models.Generator(dtype=jnp.float64)
    variables = generator.init(jax.random.key(3), z)
    assert generator.apply(variables, z, train=False).dtype == jnp.float64


def test_convs_before_batchnorm_have_no_bias():
  """A bias that the next BatchNorm cancels would only drift (see Generator's docstring)."""
  variables = models.Generator().init(jax.random.key(0), jnp.zeros((2, 100)))
  assert set(variables['params']['conv1']) == set(variables['params']['conv2']) == {'kernel'}
  assert set(variables['params']['conv3']) == {'kernel', 'bias'}


# Published counts for 10 classes on 32x32x3 inputs: WRN-40-2 2.24M, WRN-16-1 0.18M
# (Zagoruyko & Komodakis 2016 / DFAD), ResNet-18 11.17M, ResNet-34 21.28M (CIFAR variant).
@pytest.mark.parametrize('name, published', [
    ('wrn_40_2', 2.2e6), ('wrn_16_1', 0.18e6), ('resnet18', 11.2e6), ('resnet34', 21.3e6)])
def test_batchnorm_classifier_parameter_counts(name, published):
  count = models.parameter_count(models.create_classifier(name, 10), (32, 32, 3))
  assert abs(count - published) / published < 0.03, count


@pytest.mark.parametrize('name, features', [('wrn_10_1', 64), ('resnet18', 512)])
def test_batchnorm_classifier_modes(name, features):
  """Train mode updates the running statistics; inference mode reads them; any class
  count and image size work (global pooling)."""
  model = models.create_classifier(name, 7)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 20, 20, 3)))
  x = jax.random.normal(jax.random.key(1), (4, 20, 20, 3))
  (logits, feats), updates = jax.jit(functools.partial(model.apply, train=True,
                                                       mutable=['batch_stats']))(variables, x)
  assert logits.shape == (4, 7) and feats.shape == (4, features)
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates['batch_stats'],
                                       variables['batch_stats']))
  # Fresh running statistics (mean 0, var 1) make inference differ from batch statistics.
  inference, _ = jax.jit(model.apply)(variables, x)
  assert not np.allclose(inference, logits, atol=1e-3)


@pytest.mark.parametrize('name', ['generator', 'lenet5', 'lenet5_half'])
def test_initialisation_is_pytorch_default(name):
  """The authors' networks keep PyTorch's default init: every weight and bias uniform in
  +-1/sqrt(fan_in) (standard deviation bound/sqrt(3)), not Flax's LeCun-normal and zeros."""
  if name == 'generator':
    model, inputs = models.Generator(image_size=32, channels=1), jnp.zeros((2, 100))
    fan_ins = {'project': 100, 'conv1': 9 * 128, 'conv2': 9 * 128, 'conv3': 9 * 64}
  else:
    model, inputs = models.create_classifier(name, 10), jnp.zeros((1, 32, 32, 1))
    c1, c2, c3, hidden = model.widths
    fan_ins = {'conv1': 25, 'conv2': 25 * c1, 'conv3': 25 * c2, 'fc1': c3, 'fc2': hidden}
  params = model.init(jax.random.key(0), inputs)['params']
  for layer, fan_in in fan_ins.items():
    bound = 1 / np.sqrt(fan_in)
    for kind, values in params[layer].items():
      values = np.asarray(values)
      assert np.abs(values).max() <= bound, (layer, kind)
      if values.size >= 100:
        np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.15,
                                   err_msg=f'{layer}/{kind}')


@pytest.mark.parametrize('name', ['generator', 'lenet5', 'wrn_16_1', 'resnet18'])
def test_width_scales_the_channels_and_keeps_the_layers(name):
  """A width factor (the tiny presets' networks) scales every layer's channel count,
  rounded and at least 1, and keeps every layer; width 1 is the published network."""
  def shapes(width):
    if name == 'generator':
      model, inputs = models.Generator(width=width), jnp.zeros((2, 100))
    else:
      model, inputs = models.create_classifier(name, 10, width=width), jnp.zeros((1, 32, 32, 3))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  full, narrow = shapes(1.0), shapes(1 / 8)
  assert full.keys() == narrow.keys()
  assert full == shapes(models.scaled(1, 1.0))  # The default is the published width.
  for path, shape in full.items():
    image_channels = name == 'generator' and path.endswith('conv3/kernel')  # Not scaled.
    if path.endswith('kernel') and len(shape) == 4 and not image_channels:
      assert narrow[path][-1] == models.scaled(shape[-1], 1 / 8) < shape[-1], path
  assert models.scaled(3, 1 / 8) == 1 and models.scaled(64, 1 / 16) == 4


@pytest.mark.parametrize('config_module', [svhn, cifar10])
def test_the_deep_configs_networks_take_a_compiled_step_of_each_stage(config_module):
  """The SVHN and CIFAR-10 configs' networks (WRN-40-2 -> WRN-16-1, ResNet-34 ->
  ResNet-18) at the tiny presets' width, through the pipeline's own set-ups: one teacher
  step on a real-shaped batch, one generator step through the frozen teacher with the
  BatchNorm prior on every BatchNorm layer, one KD step of the student; each compiled
  once, finite, and changing what it trains. The configs' end-to-end runs use WRN-10-1
  (tests/test_datasets.py): compiling these deep steps is most of a run's time."""
  config = config_module.get_config('tiny')
  config.teacher.batch_size = 8
  config.generator.bn_prior_weight = 0.1
  teacher, generator, student = stages.build_networks(config, 10, 3)
  size, key = config.image_size, jax.random.key(0)
  images = np.random.default_rng(0).uniform(-2, 2, (8, size, size, 3)).astype(np.float32)
  labels = np.arange(8) % 10

  def one_step(state, step_fn, *args):
    # Compiled once and run once: LLVM's optimisation level 0 (for this program alone)
    # halves the deep steps' code generation, and how fast the step runs does not matter.
    jitted = jax.jit(functools.partial(step_fn, axis_name=None))
    compiled = jitted.lower(state, *args).compile({'xla_backend_optimization_level': 0})
    new, metrics = compiled(state, *args)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics)), metrics
    assert not np.array_equal(jax.tree.leaves(new['params'])[0],
                              jax.tree.leaves(state['params'])[0])
    return new, metrics

  state, step_fn, _, _ = stages.teacher_setup(config, teacher, 3, images, labels)
  state, _ = one_step(state, step_fn, None, key, images, labels)
  frozen = {'teacher': train_steps.variables_of(state)}
  state, step_fn = rdskd.generator_setup(config, generator, teacher)
  state, metrics = one_step(state, step_fn, frozen, key)
  assert metrics['bn_prior'] > 0
  frozen['generator'] = train_steps.variables_of(state)
  state, step_fn = rdskd.student_setup(config, 3, 10, generator, teacher, student)
  one_step(state, step_fn, frozen, key)
