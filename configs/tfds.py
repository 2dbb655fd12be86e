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

presets = config_lib.load_beside(__file__, 'presets')  # configs/presets.py


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  c = presets.wrn(preset, 'configs/tfds.py')
  c.dataset = ''                    # Required: a tfds image classification dataset name.
  c.image_size = 0                  # The dataset's (square, a multiple of 4).
  c.mean = ()                       # From the train split.
  c.std = ()
  return c
