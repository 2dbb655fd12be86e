"""The data-free methods: one module each, and this registry.

A method's module (`rdskd_jax/methods/<name>.py`) holds its steps, its stage set-up, its
config checks, what it adds to report.json, how `runs.load_run` restores it and how a
sweep batches its runs; shared machinery (the stage runner, `train_steps.apply_gradients`,
`kd_update`, `optimise_inputs`, the sample bank) lives outside and is imported. The
pipeline (`train.py`), the sweep and `runs.load_run` reach a method through `get`, never
by its name.

Each method's config block (its defaults, with their sources) lives here rather than in
its module: a config file loads this registry, which imports no JAX, and so reading a
config stays quick. Adding a method: its module, one entry in METHODS and STAGE_KEYS, its
config block below, its tests (docs/adding-a-method.md).
"""

import importlib
import types

import ml_collections

# The values of config.method, each the name of its module under rdskd_jax.methods.
METHODS = ('rdskd', 'dafl', 'dfad', 'deepinversion', 'zskd', 'mskd')
# The root-key index of each method's own stage (stages.stage_key); never reused, so a
# run's streams stay those of the commit that recorded it.
STAGE_KEYS = {'dafl': 6, 'dfad': 10, 'deepinversion': 11, 'zskd': 12, 'mskd': 13}


def get(name: str) -> types.ModuleType:
  """The module of method `name` (config.method), imported on first use."""
  if name not in METHODS:
    raise KeyError(name)
  return importlib.import_module(f'rdskd_jax.methods.{name}')


def add_config_blocks(c: ml_collections.ConfigDict) -> None:
  """Each method's own config block, `c.<method>`, with its defaults. A block changes
  nothing in another method's run (workdir.config_differences ignores it there)."""
  # The Data-Free Learning of Student Networks (Chen et al., ICCV 2019), DAFL's MNIST
  # settings: generator and student trained together for dafl.steps steps on one batch;
  # generator.latent_dim, generator.bn_prior_weight, student.model and student.eval_every
  # still apply.
  c.dafl = ml_collections.ConfigDict()
  c.dafl.alpha = 0.1                # Weight of the activation loss L_a.
  c.dafl.beta = 5.0                 # Weight of the (log10) information entropy loss.
  c.dafl.generator_learning_rate = 0.2  # Adam.
  c.dafl.student_learning_rate = 2e-3   # Adam.
  c.dafl.temperature = 1.0          # DAFL's KD loss has no temperature (T = 1).
  c.dafl.batch_size = 512
  c.dafl.steps = 24000              # 200 epochs x 120 steps.

  # Data-Free Adversarial Distillation (Fang et al. 2019), the authors' DFAD_mnist.py
  # defaults: each step makes dfad.student_updates student steps on fresh generated
  # batches, minimising the L1 distance of student and teacher logits, then one generator
  # step maximising it. generator.latent_dim, student.model and student.eval_every apply.
  c.dfad = ml_collections.ConfigDict()
  c.dfad.generator_learning_rate = 1e-3  # Adam.
  c.dfad.student_learning_rate = 0.01    # SGD with momentum dfad.momentum.
  c.dfad.momentum = 0.9
  c.dfad.weight_decay = 1e-4        # L2 added to the student's gradient (PyTorch's).
  c.dfad.student_updates = 5        # Student steps per generator step.
  c.dfad.batch_size = 512
  c.dfad.steps = 2000               # 40 epochs x 50 iterations, each one generator step.

  # Zero-shot knowledge transfer via adversarial belief matching (Micaelli & Storkey,
  # NeurIPS 2019; "MSKD" in the RDSKD paper, after its authors): the defaults of the
  # authors' polo5/ZeroShotKnowledgeTransfer main.py and scripts/ZeroShot (CIFAR-10,
  # WRN-40-2 -> WRN-16-1 among them). Each step is one of their iterations: one noise batch,
  # mskd.generator_updates generator steps maximising KL(teacher || student) on its images,
  # then mskd.student_updates student steps on the images of the updated generator,
  # minimising the KL plus mskd.beta times the attention-transfer term.
  # generator.latent_dim, student.model and student.eval_every still apply.
  c.mskd = ml_collections.ConfigDict()
  c.mskd.generator_learning_rate = 1e-3  # Adam, cosine-annealed to 0 over mskd.steps.
  c.mskd.student_learning_rate = 2e-3    # Adam, cosine-annealed to 0 over mskd.steps.
  c.mskd.generator_updates = 1      # n_g (--n_generator_iter).
  c.mskd.student_updates = 10       # n_s (--n_student_iter 10 in the CIFAR-10 scripts).
  c.mskd.beta = 250.0               # Attention-transfer weight (--AT_beta).
  c.mskd.temperature = 1.0          # Of both softmaxes in the KL (--KL_temperature).
  c.mskd.clip_norm = 5.0            # Global gradient norm clipped, both networks; 0: none.
  c.mskd.batch_size = 128
  c.mskd.steps = 80000              # Iterations (--total_n_pseudo_batches 8e4).

  # DeepInversion (Yin et al., CVPR 2020; the weights of the authors'
  # cifar10/deepinversion_cifar10.py and its README's "paper parameters"): no generator.
  # Each of deepinversion.steps steps optimises one batch of inputs from noise against the
  # frozen teacher and adds it to the synthesised set, then trains the student on batches
  # of that set for student.steps / deepinversion.steps KD steps: the student's optimizer,
  # batch size, schedule and temperature are config.student's, as in RDSKD's student stage.
  c.deepinversion = ml_collections.ConfigDict()
  c.deepinversion.batch_size = 256  # Inputs optimised together (the authors' --bs).
  c.deepinversion.steps = 96        # Batches synthesised (96 x 256: 24,576 images).
  c.deepinversion.iterations = 2000  # Adam steps per batch (--iters_mi).
  c.deepinversion.learning_rate = 0.05  # Adam on the inputs (--di_lr of the README).
  c.deepinversion.jitter = 2        # Random roll of up to N pixels per iteration (lim_0, lim_1).
  c.deepinversion.class_weight = 1.0  # Cross-entropy to the batch's labels.
  c.deepinversion.tv_weight = 2.5e-5  # Total-variation prior (--di_var_scale).
  c.deepinversion.l2_weight = 0.0   # L2 prior on the inputs (--di_l2_scale).
  c.deepinversion.bn_weight = 0.0   # BatchNorm-statistics prior (--r_feature_weight 10 for
                                    #   CIFAR-10); 0 for teachers without BatchNorm (LeNet-5).
  c.deepinversion.competition_weight = 0.0  # Adaptive DeepInversion's competition with the
                                    #   student (--cig_scale, 0 in the script); > 0: ADI.
  c.deepinversion.competition_temperature = 3.0  # The authors' T of the competition term.

  # Zero-Shot Knowledge Distillation (Nayak et al., ICML 2019; its stated values: 1,500
  # iterations, temperature 20, Dirichlet scales 1.0 and 0.1, 24,000 impressions for MNIST;
  # Adam 0.01 and batch 100 from da2so/Zero-shot_Knowledge_Distillation_Pytorch): no
  # generator. The first zskd.steps steps each optimise one batch of data impressions from
  # noise towards soft targets drawn from the teacher's class similarity; the next
  # zskd.steps steps train the student on the complete set, student.steps / zskd.steps KD
  # steps each, with config.student's optimizer, batch size, schedule and temperature.
  c.zskd = ml_collections.ConfigDict()
  c.zskd.batch_size = 100
  c.zskd.steps = 240                # Batches of impressions (240 x 100: 24,000).
  c.zskd.iterations = 1500          # Adam steps per batch.
  c.zskd.learning_rate = 0.01       # Adam on the inputs.
  c.zskd.temperature = 20.0         # Of the teacher's softmax against the soft targets.
  c.zskd.betas = (1.0, 0.1)         # Dirichlet scales, batches taking them in turn per class.
  # The paper augments the impressions when it distils but names no magnitudes: each KD
  # batch is translated by up to max_shift pixels (shifted-in pixels black) and, where
  # flip, mirrored; 2 pixels for digits, as the cpu teacher's data; configs/cifar10.py
  # sets CIFAR-10's usual 4 pixels and flips.
  c.zskd.max_shift = 2
  c.zskd.flip = False
