"""Writes the PyTorch teacher fixtures of tests/test_teacher_import.py (needs torch).

    python tests/data/teachers/make_fixtures.py [OUT_DIR]   # default: beside this file

For each network: `<name>.safetensors` (the state_dict, with PyTorch's key names and
layouts) and `<name>_io.npz` (fixed inputs, NHWC, and PyTorch's eval-mode logits on them).
The modules below follow the key naming of the public data-free KD code (the authors'
LeNet-5 in DAFL/RDSKD, the WideResNet of DFAD/DataFree, the CIFAR ResNet of DAFL/DataFree),
written here from their published structure. BatchNorm weights and running statistics are
drawn away from their initial 1/0 so that loading them is tested, not assumed, and the last
layer is scaled up to give logits of a few units, against which 1e-4 is a tight test. The
ResNet-18
is at 1/8 width (base 8, not 64): the same 62 tensor names and layouts, 0.7 MB instead of
45 MB; the full-width ResNet-18 is checked against torch in the tests when torch is there.
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


class LeNet5(nn.Module):
  """conv 5x5 (6) - pool - conv 5x5 (16) - pool - conv 5x5 (120) - fc 84 - fc classes."""

  def __init__(self, channels=1, num_classes=10, widths=(6, 16, 120, 84)):
    super().__init__()
    c1, c2, c3, hidden = widths
    self.conv1 = nn.Conv2d(channels, c1, 5)
    self.conv2 = nn.Conv2d(c1, c2, 5)
    self.conv3 = nn.Conv2d(c2, c3, 5)
    self.fc1 = nn.Linear(c3, hidden)
    self.fc2 = nn.Linear(hidden, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = F.relu(self.conv3(x)).flatten(1)
    return self.fc2(F.relu(self.fc1(x)))


class WideBlock(nn.Module):
  """Pre-activation block; the 1x1 `convShortcut` reads the activated input when the
  width changes, the raw input is added otherwise."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

  def forward(self, x):
    a = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return y + (x if self.convShortcut is None else self.convShortcut(a))


class WideGroup(nn.Module):
  def __init__(self, blocks, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                 for i in range(blocks)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  def __init__(self, depth=16, widen=1, channels=3, num_classes=10):
    super().__init__()
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
    self.block1 = WideGroup(n, widths[0], widths[1], 1)
    self.block2 = WideGroup(n, widths[1], widths[2], 2)
    self.block3 = WideGroup(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.relu(self.bn1(x)).mean((2, 3)))


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
  def __init__(self, blocks=(2, 2, 2, 2), base=64, channels=3, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, base, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(base)
    cin = base
    for s, n in enumerate(blocks):
      cout = base * 2 ** s
      layers = [BasicBlock(cin if i == 0 else cout, cout, 2 if s > 0 and i == 0 else 1)
                for i in range(n)]
      setattr(self, f'layer{s + 1}', nn.Sequential(*layers))
      cin = cout
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    for s in range(1, 5):
      x = getattr(self, f'layer{s}')(x)
    return self.linear(x.mean((2, 3)))


def randomize_batchnorm(model, generator):
  """BatchNorm weights, biases and running statistics away from 1, 0, 0, 1."""
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      shape = m.weight.shape
      with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
        m.bias.copy_(0.2 * torch.randn(shape, generator=generator))
        m.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
        m.num_batches_tracked.fill_(100)


FIXTURES = {  # name: (constructor, input channels)
    'lenet5': (lambda: LeNet5(channels=1), 1),
    'wrn_16_1': (lambda: WideResNet(16, 1, channels=3), 3),
    'resnet18_base8': (lambda: ResNet((2, 2, 2, 2), base=8, channels=3), 3),
}


LOGIT_SCALE = {'lenet5': 30.0, 'wrn_16_1': 10.0, 'resnet18_base8': 10.0}


def write(name, out_dir, batch=4):
  torch.manual_seed(0)
  build, channels = FIXTURES[name]
  model = build()
  randomize_batchnorm(model, torch.Generator().manual_seed(1))
  last = list(model.children())[-1]
  with torch.no_grad():
    last.weight.mul_(LOGIT_SCALE[name])
  model.eval()
  images = np.random.default_rng(2).standard_normal((batch, 32, 32, channels)).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out_dir, f'{name}.safetensors'))
  np.savez(os.path.join(out_dir, f'{name}_io.npz'), images=images, logits=logits)
  return logits


if __name__ == '__main__':
  out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
  for fixture in FIXTURES:
    logits = write(fixture, out)
    print(f'{fixture}: logits {logits.shape}, max |logit| {np.abs(logits).max():.3f}')
