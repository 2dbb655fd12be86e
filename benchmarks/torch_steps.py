"""The same two train steps in PyTorch, the authors' framework, for comparison.

    python -m benchmarks.torch_steps --batch=512 --repeats=5 [--device=cpu|cuda]

The networks and losses are those of the RDSKD core: the DAFL generator (literal nearest
upsampling and 3x3 convs, as the authors wrote it), a LeNet-5 teacher in eval mode, a
LeNet-5-half student, Adam, the RDSKD generator loss with its loss references, and the
temperature-scaled KD loss on fresh samples of the frozen generator. Prints the JSON lines
of `benchmarks.steps` with "framework": "torch". PyTorch is not a dependency of rdskd_jax;
install it to run this (`pip install torch`).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
  def __init__(self, latent_dim=100, image_size=32, channels=1):
    super().__init__()
    self.side = image_size // 4
    self.project = nn.Linear(latent_dim, 128 * self.side ** 2)
    self.norm0 = nn.BatchNorm2d(128)
    self.conv1, self.norm1 = nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128, eps=0.8)
    self.conv2, self.norm2 = nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64, eps=0.8)
    self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
    self.norm3 = nn.BatchNorm2d(channels, affine=False)

  def forward(self, z):
    x = self.norm0(self.project(z).view(-1, 128, self.side, self.side))
    x = F.leaky_relu(self.norm1(self.conv1(F.interpolate(x, scale_factor=2))), 0.2)
    x = F.leaky_relu(self.norm2(self.conv2(F.interpolate(x, scale_factor=2))), 0.2)
    return self.norm3(torch.tanh(self.conv3(x)))


class LeNet5(nn.Module):
  def __init__(self, widths=(6, 16, 120, 84), num_classes=10, channels=1):
    super().__init__()
    c1, c2, c3, hidden = widths
    self.features = nn.Sequential(
        nn.Conv2d(channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 5), nn.ReLU(), nn.Flatten(),
        nn.Linear(c3, hidden), nn.ReLU())
    self.classifier = nn.Linear(hidden, num_classes)

  def forward(self, x):
    return self.classifier(self.features(x))


def generator_loss(images, logits, refs):
  probs = F.softmax(logits, dim=1)
  one_hot = F.cross_entropy(logits, logits.argmax(dim=1))
  mean_probs = probs.mean(dim=0)
  entropy = (mean_probs * torch.log(mean_probs)).sum()
  h = images.shape[0] // 2
  lz = torch.norm(images[h:] - images[:h]) / torch.norm(probs[h:] - probs[:h])
  total = torch.exp(one_hot - refs[0]) + torch.exp(entropy - refs[1]) + 1 / (lz + 1e-20)
  return total, one_hot.detach(), entropy.detach()


def kd_loss(student_logits, teacher_logits, temperature):
  return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.softmax(teacher_logits / temperature, dim=1),
                  reduction='batchmean') * temperature ** 2


def build(batch, device):
  generator, teacher = Generator().to(device), LeNet5().to(device).eval()
  student = LeNet5(widths=(3, 8, 60, 42)).to(device)
  for p in teacher.parameters():
    p.requires_grad_(False)
  gen_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
  student_opt = torch.optim.Adam(student.parameters(), lr=2e-3)
  refs = torch.zeros(2, device=device)
  step = [0]

  def generator_step():
    generator.train()
    gen_opt.zero_grad(set_to_none=True)
    images = generator(torch.randn(batch, 100, device=device))
    total, one_hot, entropy = generator_loss(images, teacher(images), refs)
    total.backward()
    gen_opt.step()
    if step[0] % 120 == 1:
      refs.copy_(torch.stack([one_hot, entropy]))
    step[0] += 1
    return total

  def student_step():
    generator.eval()
    with torch.no_grad():
      images = generator(torch.randn(batch, 100, device=device))
      teacher_logits = teacher(images)
    student_opt.zero_grad(set_to_none=True)
    loss = kd_loss(student(images), teacher_logits, 10.0)
    loss.backward()
    student_opt.step()
    return loss

  return {'generator': generator_step, 'student': student_step}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--device', default='cpu')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--steps', default='generator,student')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  device = torch.device(args.device)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  steps = build(args.batch, device)
  for name in args.steps.split(','):
    for _ in range(args.warmup):
      steps[name]().item()
    seconds = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      steps[name]().item()
      sync()
      seconds.append(time.perf_counter() - t0)
    print(json.dumps({
        'step': name, 'batch': args.batch, 'median_seconds': statistics.median(seconds),
        'min_seconds': min(seconds), 'devices': 1, 'platform': device.type,
        'dtype': 'float32', 'parallel': 'none', 'framework': 'torch',
        'threads': torch.get_num_threads(), 'torch_version': torch.__version__}), flush=True)


if __name__ == '__main__':
  main()
