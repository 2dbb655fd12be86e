"""RDSKD on SVHN (tfds `svhn_cropped`): WRN-40-2 teacher -> WRN-16-1 student.

Presets (the string after the colon):
  python -m rdskd_jax.main --config=configs/svhn.py --workdir=W        # paper settings
  python -m rdskd_jax.main --config=configs/svhn.py:cpu --workdir=W    # 2-core CPU budget
  python -m rdskd_jax.main --config=configs/svhn.py:smoke --workdir=W  # seconds, for tests
  python -m rdskd_jax.main --config=configs/svhn.py:tiny --workdir=W   # smoke, narrow networks

The paper preset uses the authors' generator and student schedule (as for MNIST: 20 x 120
generator steps at Adam 1e-3, 1000 x 120 student steps at Adam 2e-3, batch 512) with latent
1000. The teacher recipe is a common one for WRN-40-2 on SVHN's train split (about 96%
test accuracy is published): SGD with momentum 0.9, lr 0.05 cosine-decayed over 40 epochs,
weight decay 5e-4, batch 128, random crops with 2-pixel padding and no flips (digits are
not mirror-symmetric). An accelerator recipe; on a CPU, train it elsewhere and pass
`--config.teacher.checkpoint`.
"""

import ml_collections

from rdskd_jax import config_lib

presets = config_lib.load_beside(__file__, 'presets')  # configs/presets.py


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  c = presets.wrn(preset, 'configs/svhn.py')
  c.dataset = 'svhn_cropped'
  c.image_size = 32
  c.mean = (0.4377, 0.4438, 0.4728)
  c.std = (0.1980, 0.2010, 0.1970)
  return c
