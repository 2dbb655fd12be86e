"""Networks (Flax linen, NHWC): the DAFL/RDSKD generator (its two fast convolutions in
`convs.py`) and the classifier registry.

Classifiers are called as `model.apply(variables, images, train=...)` and return
`(logits, features)`, the features being what the classifier's fully connected head
reads: conv3's outputs for LeNet-5, the pooled activations for WRN and ResNet, as in the
authors' code (DAFL's activation loss and the diagnostics read them). The registry is open: other pairs (WRN, ResNet)
register themselves with `register_classifier`.
"""

from typing import Any, Callable, Dict, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax.convs import (NarrowConv3x3, RowBandConv, UpsampleConv, torch_bias_init,
                             torch_kernel_init)

_CLASSIFIERS: Dict[str, Callable[..., nn.Module]] = {}

# config.dtype -> compute dtype. float64 needs JAX_ENABLE_X64=1; parameters stay float32
# (the tests use it to separate float32 rounding from real differences).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


def register_classifier(name: str):
  """Class decorator: makes a classifier constructible by name from a config."""
  def wrap(cls):
    _CLASSIFIERS[name] = cls
    return cls
  return wrap


def known_classifiers():
  return sorted(_CLASSIFIERS)


def output_dtype(inputs, dtype):
  """The dtype a network returns: the wider of its inputs' and its compute dtype, so that
  bfloat16 compute gives float32 outputs for float32 inputs, and float64 compute gives
  float64 even for float32 images (read from a dataset), rounding nothing."""
  return inputs.dtype if dtype is None else jnp.promote_types(inputs.dtype, dtype)


def create_classifier(name: str, num_classes: int, dtype: Any = None,
                      width: float = 1.0) -> nn.Module:
  """A registered classifier computing in `dtype` (None: the dtype of its inputs), with
  `width` times its published channel counts (1: as published)."""
  if name not in _CLASSIFIERS:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(known_classifiers())}')
  return _CLASSIFIERS[name](num_classes=num_classes, dtype=dtype, width=width)


ATTENTION = 'intermediates'  # The collection of the feature maps attention transfer reads.


def mark_attention(module: nn.Module, x) -> None:
  """Records feature map `x` for attention transfer (MSKD): the output of each pooled
  conv of LeNet-5 and of each residual group, where the authors of zero-shot knowledge
  transfer take theirs. A no-op unless the caller asks for the ATTENTION collection."""
  module.sow(ATTENTION, 'attention', x)


def with_attention(model: nn.Module, variables, images, train: bool = False):
  """One forward pass of a classifier that also returns its marked feature maps:
  ((logits, features), maps, updated collections other than the maps; in training mode
  with BatchNorm, its new statistics)."""
  mutable = [ATTENTION] + (['batch_stats'] if train and 'batch_stats' in variables else [])
  out, updates = model.apply(variables, images, train=train, mutable=mutable)
  maps = tuple(updates.get(ATTENTION, {}).get('attention', ()))
  return out, maps, {k: v for k, v in updates.items() if k != ATTENTION}


def scaled(channels: int, width: float) -> int:
  """`channels` times a width factor, rounded, at least 1: the channel count of a layer in
  a narrower (or wider) copy of a network, the same layers and code path at any width."""
  return max(1, int(round(channels * width)))


def parameter_count(model: nn.Module, image_shape=(32, 32, 3)) -> int:
  """Number of trainable parameters (BatchNorm statistics excluded), without computing."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


def max_pool_2x2(x):
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` on even heights and widths, as a reduction
  over a reshape: the same maxima, and the same gradients where a window has one maximum
  (a tie shares the gradient instead of giving it to one input). XLA:CPU differentiates
  this reduction faster than the windowed one (benchmarks/README.md)."""
  n, h, w, c = x.shape
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class _LeNet5Family(nn.Module):
  """LeNet-5 as in DAFL (input 32x32): three 5x5 convs, two 2x2 max-pools, two dense."""
  num_classes: int = 10
  widths: tuple = (6, 16, 120, 84)
  # Compute dtype (None: the inputs'). Parameters stay float32; logits and features come
  # back in the wider of the images' and the compute dtype (`output_dtype`), so losses
  # on them keep full precision under bfloat16, and all of float64's.
  dtype: Any = None
  axis_name: Optional[str] = None  # Unused (no BatchNorm); every classifier takes it.
  width: float = 1.0  # Times `widths` (create_classifier).

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # No BatchNorm or dropout: the same function in both modes.
    c1, c2, c3, hidden = (scaled(c, self.width) for c in self.widths)
    x = images
    def conv(features, name):  # PyTorch's default initialisation, as the authors' LeNet-5.
      return RowBandConv(features, (5, 5), dtype=self.dtype, name=name,
                         kernel_init=torch_kernel_init,
                         bias_init=torch_bias_init(25 * x.shape[-1]))

    def dense(features, name):
      return nn.Dense(features, dtype=self.dtype, name=name, kernel_init=torch_kernel_init,
                      bias_init=torch_bias_init(x.shape[-1]))

    x = nn.relu(conv(c1, 'conv1')(x))
    x = max_pool_2x2(x)
    mark_attention(self, x)
    x = nn.relu(conv(c2, 'conv2')(x))
    x = max_pool_2x2(x)
    mark_attention(self, x)
    x = nn.relu(conv(c3, 'conv3')(x))
    # The features are the flattened conv3 output, before the dense layers: what the
    # authors' LeNet-5 returns, and so what DAFL's activation loss reads.
    x = features = x.reshape((x.shape[0], -1))
    x = nn.relu(dense(hidden, 'fc1')(x))
    logits = dense(self.num_classes, 'fc2')(x)
    out = output_dtype(images, self.dtype)
    return logits.astype(out), features.astype(out)


@register_classifier('lenet5')
class LeNet5(_LeNet5Family):
  """LeNet-5 teacher (conv 6, 16, 120; fc 84)."""
  widths: tuple = (6, 16, 120, 84)


@register_classifier('lenet5_half')
class LeNet5Half(_LeNet5Family):
  """LeNet-5-half student (conv 3, 8, 60; fc 42)."""
  widths: tuple = (3, 8, 60, 42)


# ------------------------------------------------------------ BatchNorm classifiers
#
# Wide-ResNet and CIFAR-style ResNet, as in the data-free KD literature (DAFL, DFAD, RDSKD):
# 3x3 stem without max-pool, so 32x32 inputs keep 32x32 in the first group. BatchNorm has
# PyTorch's momentum 0.1 (0.9 in Flax's convention) and epsilon 1e-5; in training it uses
# batch statistics, synchronised over `axis_name` under data parallelism, and running ones
# otherwise. Convs have no bias (each is followed by a BatchNorm) and He-normal kernels
# (fan-out, as the reference implementations initialise them).

_he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class _BatchNormClassifier(nn.Module):
  """Shared plumbing: conv and BatchNorm factories in the module's dtype and mode."""
  num_classes: int = 10
  dtype: Any = None
  axis_name: Optional[str] = None
  width: float = 1.0  # Times every conv's published channel count (create_classifier).

  def _conv(self, features, kernel=3, stride=1, name=None):
    features = scaled(features, self.width)
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=kernel // 2,
                   use_bias=False, kernel_init=_he_normal, dtype=self.dtype, name=name)

  def _norm(self, train, name=None):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=self.axis_name if train else None, dtype=self.dtype,
                        use_fast_variance=False, name=name)

  def _head(self, features, images):
    """Global average pool -> Dense; returns (logits, pooled features) in `output_dtype`."""
    pooled = jnp.mean(features, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(pooled)
    out = output_dtype(images, self.dtype)
    return logits.astype(out), pooled.astype(out)


class WideResNet(_BatchNormClassifier):
  """WRN-depth-widen (Zagoruyko & Komodakis 2016) with pre-activation basic blocks:
  stem conv 16 -> three groups of (depth - 4) / 6 blocks of widths 16k, 32k, 64k (strides
  1, 2, 2) -> BN -> ReLU -> global average pool -> Dense. No dropout."""
  depth: int = 16
  widen: int = 1

  @nn.compact
  def __call__(self, images, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth={self.depth}: expected 6n + 4')
    blocks = (self.depth - 4) // 6
    x = self._conv(16, name='stem')(images)
    for g, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
      for b in range(blocks):
        x = self._block(x, width * self.widen, stride if b == 0 else 1, train, f'g{g}b{b}')
      mark_attention(self, x)
    x = nn.relu(self._norm(train, 'final_bn')(x))
    return self._head(x, images)

  def _block(self, x, width, stride, train, name):
    """Pre-activation: BN-ReLU-conv-BN-ReLU-conv; a 1x1 conv of the activated input is
    the shortcut where the shape changes."""
    activated = nn.relu(self._norm(train, f'{name}_bn1')(x))
    shortcut = x
    if stride != 1 or x.shape[-1] != scaled(width, self.width):
      shortcut = self._conv(width, 1, stride, f'{name}_proj')(activated)
    y = self._conv(width, 3, stride, f'{name}_conv1')(activated)
    y = nn.relu(self._norm(train, f'{name}_bn2')(y))
    y = self._conv(width, 3, 1, f'{name}_conv2')(y)
    return y + shortcut


class CifarResNet(_BatchNormClassifier):
  """ResNet with basic blocks for 32x32 inputs (He et al. 2016, CIFAR variant used by
  DAFL): 3x3 stem conv 64 -> BN -> ReLU (no max-pool) -> four stages of widths 64, 128,
  256, 512 (strides 1, 2, 2, 2) -> global average pool -> Dense. `base_width` scales all
  widths (64: the registered ResNets; smaller ones make small test fixtures)."""
  stage_sizes: tuple = (2, 2, 2, 2)
  base_width: int = 64

  @nn.compact
  def __call__(self, images, train: bool = False):
    base = self.base_width
    x = nn.relu(self._norm(train, 'stem_bn')(self._conv(base, name='stem')(images)))
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        x = self._block(x, base * 2 ** s, 2 if s > 0 and b == 0 else 1, train, f's{s}b{b}')
      mark_attention(self, x)
    return self._head(x, images)

  def _block(self, x, width, stride, train, name):
    """conv-BN-ReLU-conv-BN plus the shortcut (1x1 conv and BN where the shape changes),
    then ReLU."""
    y = nn.relu(self._norm(train, f'{name}_bn1')(self._conv(width, 3, stride, f'{name}_conv1')(x)))
    y = self._norm(train, f'{name}_bn2')(self._conv(width, 3, 1, f'{name}_conv2')(y))
    shortcut = x
    if stride != 1 or x.shape[-1] != scaled(width, self.width):
      shortcut = self._norm(train, f'{name}_proj_bn')(self._conv(width, 1, stride, f'{name}_proj')(x))
    return nn.relu(y + shortcut)


def _register_variant(name, base, **fields):
  """Registers `base` with some fields fixed under `name` (as a subclass, so that the
  registry's `cls(num_classes=..., dtype=...)` call works unchanged)."""
  register_classifier(name)(type(name, (base,), {
      '__annotations__': {k: type(v) for k, v in fields.items()}, **fields,
      '__doc__': f'{base.__name__} with {fields}.'}))


_register_variant('wrn_40_2', WideResNet, depth=40, widen=2)
_register_variant('wrn_16_1', WideResNet, depth=16, widen=1)
_register_variant('wrn_16_2', WideResNet, depth=16, widen=2)
_register_variant('wrn_10_1', WideResNet, depth=10, widen=1)
_register_variant('resnet18', CifarResNet, stage_sizes=(2, 2, 2, 2))
_register_variant('resnet34', CifarResNet, stage_sizes=(3, 4, 6, 3))


GENERATOR_BATCHNORM = ('running', 'batch')


def generate(generator, variables, z, batchnorm: str = 'running', axis_name=None):
  """Images of a trained generator from noise `z`, its variables unchanged.

  batchnorm='running': BatchNorm normalises with its running statistics (inference mode, as
  the authors' student-train.py samples). 'batch': every call's batch is normalised by its
  own statistics, as in the generator's training and in DAFL's student updates; over the
  global batch when `axis_name` names the data-parallel axis. The statistics of a batch
  depend on its size: the student stage draws `student.batch_size` samples per call.
  """
  if batchnorm == 'running':
    return generator.apply(variables, z, train=False)
  if batchnorm != 'batch':
    raise ValueError(f'batchnorm={batchnorm!r}; expected one of {GENERATOR_BATCHNORM}')
  images, _ = generator.clone(axis_name=axis_name).apply(variables, z, train=True,
                                                         mutable=['batch_stats'])
  return images


class Generator(nn.Module):
  """The DAFL generator used by RDSKD, NHWC.

  Dense(latent -> 128*s*s) -> BN -> up x2 -> conv3x3 128 -> BN(eps 0.8) -> LeakyReLU(0.2)
  -> up x2 -> conv3x3 64 -> BN(eps 0.8) -> LeakyReLU(0.2) -> conv3x3 C -> tanh
  -> BN without scale and bias; s = image_size / 4. BatchNorm uses batch statistics when
  `train` (synchronised over `axis_name` under data parallelism) and running statistics
  otherwise. Momentum 0.9 is PyTorch's default 0.1 in Flax's convention. `subpixel=False`
  computes every conv literally (the reference the fast forms are tested against).

  The two convs followed by a BatchNorm have no bias. The authors' PyTorch generator gives
  them one, but the BatchNorm subtracts each channel's batch mean, which cancels a
  per-channel bias exactly: the function is the same with or without it, and its true
  gradient is zero. In float arithmetic that gradient is rounding noise whose value depends
  on the summation order (so on the device count), and Adam, which divides by the gradient's
  running magnitude, turns the noise into lr-sized steps. The bias would then drift
  differently on 1 and on 8 devices, and with it the running means used at inference.

  `dtype` is the compute dtype (None: the noise's; bfloat16 on accelerators). Parameters
  and BatchNorm statistics stay float32, and the images come back in `output_dtype`.
  """
  image_size: int = 32
  channels: int = 1
  subpixel: bool = True
  axis_name: Optional[str] = None
  dtype: Any = None
  width: float = 1.0  # Times the channel counts 128 and 64 (the tests' tiny generators).

  @nn.compact
  def __call__(self, z, train: bool = True):
    s = self.image_size // 4
    wide, narrow = scaled(128, self.width), scaled(64, self.width)
    norm = lambda eps, affine=True: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=eps, use_scale=affine,
        use_bias=affine, axis_name=self.axis_name if train else None, dtype=self.dtype,
        use_fast_variance=False)
    x = nn.Dense(wide * s * s, dtype=self.dtype, name='project', kernel_init=torch_kernel_init,
                 bias_init=torch_bias_init(z.shape[-1]))(z)
    x = norm(1e-5)(x.reshape(z.shape[0], s, s, wide))
    x = UpsampleConv(wide, self.subpixel, use_bias=False, name='conv1')(x)
    x = nn.leaky_relu(norm(0.8)(x), 0.2)
    x = UpsampleConv(narrow, self.subpixel, use_bias=False, name='conv2')(x)
    x = nn.leaky_relu(norm(0.8)(x), 0.2)
    if self.subpixel:
      x = NarrowConv3x3(self.channels, name='conv3')(x)
    else:
      x = nn.Conv(self.channels, (3, 3), padding='SAME', dtype=self.dtype, name='conv3',
                  kernel_init=torch_kernel_init, bias_init=torch_bias_init(9 * x.shape[-1]))(x)
    x = jnp.tanh(x)
    return norm(1e-5, affine=False)(x).astype(output_dtype(z, self.dtype))


def final_kernel(params, num_classes: int):
  """The weights (features, classes) of a classifier's final layer: the last Dense kernel
  (in the order the module creates its layers) with one column per class."""
  kernels = [v for path, v in traverse_util.flatten_dict(params).items()
             if path[-1] == 'kernel' and v.ndim == 2 and v.shape[-1] == num_classes]
  if not kernels:
    raise ValueError(f'no Dense kernel with {num_classes} outputs among the parameters')
  return kernels[-1]
