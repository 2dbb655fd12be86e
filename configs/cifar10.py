"""RDSKD on CIFAR-10 (tfds `cifar10`): ResNet-34 teacher -> ResNet-18 student.

Presets (the string after the colon):
  python -m rdskd_jax.main --config=configs/cifar10.py --workdir=W        # paper settings
  python -m rdskd_jax.main --config=configs/cifar10.py:cpu --workdir=W    # 2-core CPU budget
  python -m rdskd_jax.main --config=configs/cifar10.py:smoke --workdir=W  # seconds, for tests
  python -m rdskd_jax.main --config=configs/cifar10.py:tiny --workdir=W   # smoke, narrow networks

The paper preset follows the authors' code: generator Adam 1e-3 for 20 x 120 steps, then
the student with Adam 2e-3 for 1000 x 120 steps, x0.1 from epoch 800, batch 512, latent
1000. The teacher recipe is the standard one for ResNet-34 on CIFAR-10 (about 95% test
accuracy is published for it): SGD with momentum 0.9, lr 0.1 cosine-decayed over 200
epochs, weight decay 5e-4, batch 128, random crops with 4-pixel padding and horizontal
flips. It is an accelerator recipe; on a CPU, train it
elsewhere and pass `--config.teacher.checkpoint`.
"""

import ml_collections

from rdskd_jax import config_lib

presets = config_lib.load_beside(__file__, 'presets')  # configs/presets.py


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  c = config_lib.base_config(preset)
  c.dataset = 'cifar10'
  c.image_size = 32
  c.mean = (0.4914, 0.4822, 0.4465)
  c.std = (0.2023, 0.1994, 0.2010)
  c.teacher.model = 'resnet34'
  c.teacher.batch_size = 128
  c.teacher.epochs = 200
  c.teacher.optimizer = 'sgd'
  c.teacher.learning_rate = 0.1
  c.teacher.momentum = 0.9
  c.teacher.weight_decay = 5e-4
  c.teacher.schedule = 'cosine'
  c.teacher.max_shift = 4           # Random crop of the 4-pixel zero-padded image.
  c.teacher.flip = True
  c.generator.latent_dim = 1000
  c.student.model = 'resnet18'
  c.student.schedule = 'step'
  c.student.decay_epochs = (800,)   # lr x0.1 from student epoch 800 (authors' code).
  c.student.decay_factor = 0.1
  c.eval_batch_size = 500
  # DFAD (method='dfad'), the authors' DFAD_cifar.py: batch 256, 500 epochs x 50 steps,
  # student SGD 0.1 with momentum 0.9 and weight decay 5e-4 (their latent is 256; set
  # generator.latent_dim for it).
  c.dfad.batch_size = 256
  c.dfad.steps = 25000
  c.dfad.student_learning_rate = 0.1
  c.dfad.weight_decay = 5e-4
  # DeepInversion (method='deepinversion'): the README's "paper parameters" of the authors'
  # cifar10 script (BatchNorm prior 10, Adam 0.05, 2,000 iterations of batch 256); 200
  # batches (51,200 images, about the train split) and 600 KD steps after each are chosen
  # here: the script synthesises one batch and does not distil.
  c.deepinversion.bn_weight = 10.0
  c.deepinversion.steps = 200
  # ZSKD (method='zskd'): the paper's 40,000 impressions for CIFAR-10 (400 batches of 100).
  c.zskd.steps = 400
  c.zskd.max_shift = 4              # The impressions' augmentation: its teacher's.
  c.zskd.flip = True

  if preset == 'paper':
    pass
  elif preset == 'cpu':
    presets.deep_cpu(c)
    c.student.decay_epochs = (8,)   # Of 10 (60-step) epochs, as 800 of the paper's 1000.
  elif preset in ('smoke', 'tiny'):
    presets.deep_smoke(c)
    c.student.decay_epochs = (1,)
    if preset == 'tiny':
      presets.narrow(c, classifier_width=1 / 8)
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/cifar10.py; expected 'paper', "
                     "'cpu', 'smoke' or 'tiny'")
  return c
