"""Presets the config files share: the smoke settings of the tests, the CPU and smoke
budgets of the BatchNorm networks, and the WRN-40-2 -> WRN-16-1 recipe.

Config files load this module by path, `config_lib.load_beside(__file__, 'presets')`, so
that a config file works from any working directory. A preset sets fields of a
`config_lib.base_config`; the field list and its documentation stay in the library.
"""

import ml_collections

from rdskd_jax import config_lib


def smoke(c: ml_collections.ConfigDict) -> None:
  """Seconds-long settings for tests: a few steps of every stage on small batches."""
  c.teacher.epochs = 1
  c.teacher.batch_size = 512
  c.teacher.max_train_examples = 4096
  c.generator.batch_size = 16
  c.generator.steps = 6
  c.generator.epoch_length = 3
  c.student.batch_size = 16
  c.student.steps = 6
  c.student.eval_every = 3
  c.student.agreement_samples = 256
  c.diagnostic_samples = 256
  c.image_every = 3
  c.dafl.batch_size = 16
  c.dafl.steps = 6
  c.dfad.batch_size = 16
  c.dfad.steps = 6
  c.dfad.student_updates = 2
  c.mskd.batch_size = 16
  c.mskd.steps = 6
  c.mskd.student_updates = 2
  c.deepinversion.batch_size = 16
  c.deepinversion.steps = 3       # 2 KD steps after each batch (student.steps 6).
  c.deepinversion.iterations = 4
  c.deepinversion.competition_weight = 1.0  # Smoke runs take every term's path.
  c.deepinversion.l2_weight = 1e-4
  c.zskd.batch_size = 16
  c.zskd.steps = 3                # Then 3 steps of 2 KD steps each.
  c.zskd.iterations = 4
  c.checkpoint_every = 4
  c.log_every = 2
  c.steps_per_call = 1  # The tests of single steps; tests/test_fused_steps.py fuses them.


def tiny(c: ml_collections.ConfigDict) -> None:
  """The smoke settings on a generator a few channels wide, a teacher trained on 512
  examples, reporting on a slice of the test split, no figures: every stage's code path in
  the fewest seconds, for the tests of resume, damage, parallelism, sweeps and methods.
  The real widths have their own tests."""
  smoke(c)
  narrow(c)
  # The smoke teacher's 8 steps on batches of 64: its stage is most of a float64 run.
  c.teacher.batch_size = 64
  c.teacher.max_train_examples = 512


def narrow(c: ml_collections.ConfigDict, classifier_width: float = 1.0) -> None:
  """What makes a smoke preset tiny: narrow networks, light reporting. The classifiers'
  width is the config file's: LeNet-5 is small already, the deep networks keep their depth
  (the same code path) at a fraction of their width."""
  c.generator.width = 1 / 16        # 8 and 4 channels instead of 128 and 64.
  c.teacher.width = c.student.width = classifier_width
  c.test_examples = 1000
  c.figures = False


def deep_cpu(c: ml_collections.ConfigDict) -> None:
  """BatchNorm networks (WRN, ResNet) on a 2-core CPU: small batches and few steps, a run
  that shows the pipeline working; accuracy needs the paper preset on an accelerator."""
  c.teacher.epochs = 2
  c.teacher.max_train_examples = 10000
  c.generator.batch_size = 64
  c.generator.steps = 120
  c.generator.epoch_length = 40
  c.student.batch_size = 64
  c.student.steps = 600
  c.student.epoch_length = 60
  c.student.eval_every = 200
  c.dfad.batch_size = 64
  c.dfad.steps = 100
  c.deepinversion.batch_size = 64
  c.deepinversion.steps = 10        # 60 KD steps after each batch.
  c.deepinversion.iterations = 100
  c.zskd.batch_size = 64
  c.zskd.steps = 10
  c.zskd.iterations = 150
  c.image_every = 40
  c.checkpoint_every = 60
  c.log_every = 10


def deep_smoke(c: ml_collections.ConfigDict) -> None:
  """Seconds of every stage (the shared smoke settings, with batches a deep net runs
  quickly on a CPU)."""
  smoke(c)
  c.teacher.batch_size = 32
  c.teacher.max_train_examples = 256
  c.student.epoch_length = 3
  c.eval_batch_size = 256
  c.student.agreement_samples = 64


def wrn(preset: str, file: str) -> ml_collections.ConfigDict:
  """WRN-40-2 -> WRN-16-1 with latent 1000 and the SVHN teacher recipe (SGD 0.05, momentum
  0.9, wd 5e-4, cosine over 40 epochs, batch 128, 2-pixel shifts), with `preset` applied;
  the caller sets the dataset fields. `file` names the config file in errors."""
  c = config_lib.base_config(preset)
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
  c.deepinversion.bn_weight = 10.0  # DeepInversion's CIFAR-10 weight (configs/cifar10.py).
  c.student.model = 'wrn_16_1'
  c.eval_batch_size = 500
  if preset == 'cpu':
    deep_cpu(c)
  elif preset in ('smoke', 'tiny'):
    deep_smoke(c)
  elif preset != 'paper':
    raise ValueError(f"unknown preset {preset!r} for {file}; expected 'paper', 'cpu', 'smoke' "
                     "or 'tiny'")
  if preset == 'tiny':
    narrow(c, classifier_width=1 / 8)
  return c
