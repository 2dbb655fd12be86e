"""RDSKD on any tfds image classification dataset, by name:

  python -m rdskd_jax.main --config=configs/tfds.py:cpu --config.dataset=NAME --workdir=W

Class count, channels and image size come from the dataset's tfds metadata; the
normalisation mean and std are computed from its train split (cached in the workdir)
unless given with --config.mean/--config.std. The networks are the SVHN pair, WRN-40-2
-> WRN-16-1 (BatchNorm, global pooling, so any image size works); the generator's output
follows the dataset's channels and size. Presets as in configs/cifar10.py.
"""

import ml_collections

from rdskd_jax import config_lib


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  c = config_lib.base_config(preset)
  c.dataset = ''                    # Required: a tfds image classification dataset name.
  c.image_size = 0                  # The dataset's (square, a multiple of 4).
  c.mean = ()                       # From the train split.
  c.std = ()
  c.teacher.model = 'wrn_40_2'
  c.teacher.batch_size = 128
  c.teacher.epochs = 40
  c.teacher.optimizer = 'sgd'
  c.teacher.learning_rate = 0.05
  c.teacher.momentum = 0.9
  c.teacher.weight_decay = 5e-4
  c.teacher.schedule = 'cosine'
  c.teacher.max_shift = 2
  c.generator.latent_dim = 1000
  c.student.model = 'wrn_16_1'
  c.eval_batch_size = 500

  if preset == 'paper':
    pass
  elif preset == 'cpu':
    config_lib.deep_cpu_preset(c)
  elif preset == 'smoke':
    config_lib.deep_smoke_preset(c)
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/tfds.py; expected 'paper', "
                     "'cpu' or 'smoke'")
  return c
