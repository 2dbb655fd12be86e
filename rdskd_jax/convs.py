"""Convolutions in exact, faster forms, two of the generator's and LeNet-5's, and PyTorch's
default initialisers, which the authors' generator and LeNet-5 keep (docs/speed-cpu.md).

`UpsampleConv`: nearest 2x upsampling then a 3x3 conv, computed as four 2x2 convs on the
low-resolution input (sub-pixel form). `NarrowConv3x3`: a 3x3 conv to few channels as one
matmul and nine shifted adds. `RowBandConv`: LeNet-5's 5x5 'VALID' convs as one matmul
per kernel row. Each computes the same function, with the same parameters, as the
literal layer.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# PyTorch's default initialisation of nn.Linear and nn.Conv2d, which the authors' generator
# and LeNet-5 keep: weights and biases uniform in +-1/sqrt(fan_in). It is not Flax's
# default (LeCun-normal weights, 3x the variance, and zero biases), and the difference
# changes what the generator learns: the BatchNorms with epsilon 0.8 are not scale
# invariant, so the weights' scale sets the contrast before the tanh.
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """PyTorch's default bias initialiser for a layer with `fan_in` inputs per output."""
  bound = 1 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _subpixel_kernel(kernel):
  """3x3 kernel on a 2x nearest-upsampled input -> 2x2 kernels on the input, per phase.

  Output pixel (2i+a, 2j+b) of conv3x3(upsample(x)) reads upsampled rows 2i+a-1..2i+a+1,
  i.e. input rows (i-1, i) with taps (w0, w1+w2) when a=0 and (i, i+1) with taps
  (w0+w1, w2) when a=1; the same for columns. Returns (2, 2, Cin, 4*Cout), phases in
  order (a, b) = (0,0), (0,1), (1,0), (1,1) along the output channels.
  """
  taps = [jnp.stack([kernel[0], kernel[1] + kernel[2]]),      # phase 0
          jnp.stack([kernel[0] + kernel[1], kernel[2]])]      # phase 1
  kernels = []
  for a in range(2):
    rows = taps[a]                                            # (2, 3, Cin, Cout)
    for b in range(2):
      cols = jnp.swapaxes(rows, 0, 1)                         # (3, 2, Cin, Cout)
      cols = jnp.stack([cols[0], cols[1] + cols[2]]) if b == 0 else \
             jnp.stack([cols[0] + cols[1], cols[2]])          # (2, 2, Cin, Cout)
      kernels.append(jnp.swapaxes(cols, 0, 1))
  return jnp.concatenate(kernels, axis=-1)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _pad1(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _phase_conv_as_matmul(x, kernel4):
  """2x2 'VALID' conv of the 1-padded input as patches @ kernel (one large matmul)."""
  n, h, w, c = x.shape
  xp = _pad1(x)
  patches = jnp.concatenate(
      [xp[:, i:i + h + 1, j:j + w + 1] for i in range(2) for j in range(2)], axis=-1)
  out = patches.reshape(-1, 4 * c) @ kernel4.reshape(4 * c, -1)
  return out.reshape(n, h + 1, w + 1, -1)


@jax.custom_vjp
def _phase_conv(x, kernel4):
  """2x2 'VALID' conv of the 1-padded input: XLA's conv forward, matmul backward.

  Both compute the same function; on CPU, XLA's conv is the faster forward and its
  gradient for this shape is about 75x slower than that of the matmul form.
  """
  return jax.lax.conv_general_dilated(_pad1(x), kernel4, (1, 1), 'VALID',
                                      dimension_numbers=_NHWC)


def _phase_conv_fwd(x, kernel4):
  return _phase_conv(x, kernel4), (x, kernel4)


def _phase_conv_bwd(residuals, cotangent):
  _, vjp = jax.vjp(_phase_conv_as_matmul, *residuals)
  return vjp(cotangent)


_phase_conv.defvjp(_phase_conv_fwd, _phase_conv_bwd)


class UpsampleConv(nn.Module):
  """Nearest 2x upsampling followed by a 3x3 'SAME' conv, with a 3x3 kernel parameter.

  `subpixel=True` computes the same function as four 2x2 convs on the low-resolution
  input (2.25x fewer multiply-adds, no upsampled tensor), exact up to float rounding;
  `subpixel=False` is the literal form. Both read the same parameters. Computes in the
  input's dtype.
  """
  features: int
  subpixel: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param('kernel', torch_kernel_init, (3, 3, cin, self.features), jnp.float32)
    kernel = kernel.astype(x.dtype)
    if not self.subpixel:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_NHWC)
      return self._add_bias(y, cin)
    n, h, w, _ = x.shape
    y = _phase_conv(x, _subpixel_kernel(kernel))
    # y: (n, h+1, w+1, 4*C); phase (a, b) of output pixel (i, j) sits at y[i+a, j+b].
    y = y.reshape(n, h + 1, w + 1, 2, 2, self.features)
    rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3)
            for a in range(2)]                                       # (n, h, w, 2, C)
    y = jnp.stack(rows, axis=2)                                      # (n, h, 2, w, 2, C)
    return self._add_bias(y.reshape(n, 2 * h, 2 * w, self.features), cin)

  def _add_bias(self, y, cin):
    if not self.use_bias:
      return y
    bias = self.param('bias', torch_bias_init(9 * cin), (self.features,), jnp.float32)
    return y + bias.astype(y.dtype)


class NarrowConv3x3(nn.Module):
  """A 3x3 'SAME' conv for few output channels: one matmul to 9*Cout tap channels, then
  nine shifted adds. The same function as nn.Conv(features, (3, 3)) with the same
  parameters; on CPU XLA's conv runs this shape (64 -> 1 channel) at ~5 GFLOP/s, and this
  form is 7x faster forward and 4x faster with its gradient.
  """
  features: int

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    kernel = self.param('kernel', torch_kernel_init, (3, 3, c, self.features), jnp.float32)
    bias = self.param('bias', torch_bias_init(9 * c), (self.features,), jnp.float32)
    taps = jnp.transpose(kernel.astype(x.dtype), (2, 0, 1, 3)).reshape(c, 9 * self.features)
    y = (x.reshape(-1, c) @ taps).reshape(n, h, w, 3, 3, self.features)
    y = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    out = sum(y[:, i:i + h, j:j + w, i, j] for i in range(3) for j in range(3))
    return out + bias.astype(out.dtype)


def _band(kernel, width: int):
  """(kh, kw, Cin, Cout) kernel -> (kh, width*Cin, (width-kw+1)*Cout): row i's taps as a
  banded matrix, entry (v*Cin + c, u*Cout + d) = kernel[i, v-u, c, d] where 0 <= v-u < kw."""
  kh, kw, cin, cout = kernel.shape
  out_width = width - kw + 1
  v, u, j = np.arange(width)[:, None, None], np.arange(out_width)[None, :, None], np.arange(kw)
  shift = jnp.asarray(v == u + j, kernel.dtype)                    # (width, out_width, kw)
  band = jnp.einsum('vuj,ijcd->ivcud', shift, kernel)
  return band.reshape(kh, width * cin, out_width * cout)


class RowBandConv(nn.Module):
  """A 'VALID' stride-1 conv on small images (LeNet-5's 5x5s) as one matmul per kernel row:
  each input row, flattened with its channels, times that kernel row's taps laid out as a
  banded matrix. The same function as nn.Conv(features, kernel_size, padding='VALID'),
  with the same parameters; on CPU XLA's conv runs LeNet-5's few-channel shapes slowly
  (one input channel in the first), and this form runs the student's forward and backward
  several times faster (benchmarks/README.md). `kernel_init`, `bias_init` and `dtype` as
  nn.Conv's."""
  features: int
  kernel_size: tuple = (5, 5)
  dtype: object = None
  kernel_init: object = nn.initializers.lecun_normal()
  bias_init: object = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    n, h, w, cin = x.shape
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, cin, self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    band, out_h, out_w = _band(kernel, w), h - kh + 1, w - kw + 1
    rows = sum(x[:, i:i + out_h].reshape(n * out_h, w * cin) @ band[i] for i in range(kh))
    return rows.reshape(n, out_h, out_w, self.features) + bias
