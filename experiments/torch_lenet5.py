"""A LeNet-5 teacher trained in PyTorch on MNIST, saved as a safetensors state_dict: the
outside teacher of the README's "Distil your own teacher" (needs torch).

    python experiments/torch_lenet5.py OUT.safetensors [--epochs=5]

The network is the fixture script's `LeNet5` (the authors' key names); the recipe is the
`cpu` preset's teacher (Adam 2e-3 with cosine decay, batch 128, shifts of up to 2 pixels),
on the MNIST train split, normalised with mean 0.1307 and std 0.3081 at 32x32. The last
line is the PyTorch model's own accuracy on the test split, for comparison with what
`python -m rdskd_jax.teacher convert ... --dataset=mnist` reports for the converted one.
"""

import argparse
import importlib.util
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from configs import mnist
from rdskd_jax import data

_FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'tests', 'data', 'teachers',
                         'make_fixtures.py')


def _torch_lenet5():
  spec = importlib.util.spec_from_file_location('make_fixtures', _FIXTURES)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.LeNet5(channels=1, num_classes=10)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args()
  torch.manual_seed(0)
  config = mnist.get_config('cpu')
  config.data_dir = args.data_dir
  images, labels = data.load_split(config, 'train')
  test_images, test_labels = data.load_split(config, 'test')
  fill = (0 - config.mean[0]) / config.std[0]  # Shifted-in pixels are black.
  model = _torch_lenet5()
  batch, steps_per_epoch = 128, len(images) // 128
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for epoch in range(args.epochs):
    order = rng.permutation(len(images))
    model.train()
    for step in range(steps_per_epoch):
      take = order[step * batch:(step + 1) * batch]
      x = data.random_shift(rng, images[take], 2, fill)
      x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
      loss = F.cross_entropy(model(x), torch.from_numpy(labels[take]).long())
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      schedule.step()
    print(f'epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f} '
          f'({time.perf_counter() - t0:.0f}s)', flush=True)
  model.eval()
  with torch.no_grad():
    x = torch.from_numpy(test_images).permute(0, 3, 1, 2)
    predicted = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
  accuracy = float((predicted.numpy() == test_labels).mean())
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  save_file(model.state_dict(), args.out)
  print(f'saved {args.out}; PyTorch test accuracy {accuracy:.4f} ({len(test_labels)} images)')


if __name__ == '__main__':
  main()
