"""Every config field, documented; the presets live in `configs/`.

Light on purpose: a config file imports this module alone (no JAX), so reading a config
is fast; `config_checks.validate` checks one against the code and the devices.
"""

import hashlib
import importlib.util
import os
import sys
import types

import ml_collections

from rdskd_jax.errors import ConfigError


def base_config(preset: str) -> ml_collections.ConfigDict:
  """Every field a run reads, with the paper's MNIST schedule; `configs/*.py` set the
  dataset, the networks and their presets on top of it."""
  c = ml_collections.ConfigDict()
  c.preset = preset                 # Which preset built this config (recorded in report.json).
  c.dataset = 'mnist'               # tfds name of an image classification dataset; '': none
                                    #   (an outside teacher, nothing evaluated on real data).
  c.num_classes = 0                 # With dataset '': the teacher's classes (else the dataset's).
  c.channels = 0                    # With dataset '': image channels (else the dataset's).
  c.data_dir = ''                   # tfds data_dir; empty: TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.image_size = 32                 # Images are resized to image_size^2; 0: the dataset's size.
  c.mean = (0.1307,)                # Per-channel normalisation mean; (): computed from the
  c.std = (0.3081,)                 #   train split (cached in the workdir). Per-channel std.
  c.seed = 0                        # Root of every random stream of the run.
  c.method = 'rdskd'                # 'rdskd' (generator, then student); 'dafl' or 'dfad' (joint);
                                    #   'deepinversion' or 'zskd' (inputs optimised, no generator).
  c.parallel = 'pmap'               # 'pmap', 'shard_map' or 'none' (plain jit, one device).
  c.num_devices = 0                 # Devices to use (the first N); 0: all, of all processes.
  c.distributed = False             # jax.distributed.initialize() first (multi-host; see README).
  c.dtype = 'float32'               # Compute dtype, 'float32' or 'bfloat16' (params, losses f32).
  c.checkpoint_every = 120          # Steps between checkpoints in every stage.
  c.steps_per_call = 0              # Steps per compiled call (a scan) in the generated-sample
                                    #   stages; 0: the platform's default (runner.py).
  c.log_every = 20                  # Steps between metrics.jsonl lines and progress lines.
  c.max_bad_steps = 20              # Stop after N consecutive steps with non-finite loss/grads.
  c.eval_batch_size = 1000          # Batch size of test-set evaluation (no effect on results).
  c.image_every = 240               # Generator steps between TensorBoard sample grids (and
                                    #   coverage metrics of 512 samples); 0: never.
  c.diagnostic_samples = 4096       # Generated samples behind report.json's diagnostics.
  c.test_examples = 0               # Report on the first N examples of the test split; 0: all
                                    #   (a slice only to make tests quick).
  c.figures = True                  # Draw samples.png and curves.png at the end of the run.

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = 'lenet5'        # Classifier name in rdskd_jax.models.
  c.teacher.width = 1.0             # Times the model's published channel counts (the tests'
                                    #   tiny networks: less); 1: as published.
  c.teacher.checkpoint = ''         # Trained teacher: a teacher_variables directory or a PyTorch
                                    #   state_dict (.safetensors/.pt/.pth); empty: train one.
  c.teacher.batch_size = 256        # Real-data batch size (DAFL's teacher-train.py).
  c.teacher.epochs = 10             # Passes over the train split.
  c.teacher.optimizer = 'adam'      # 'adam', or 'sgd' (with momentum).
  c.teacher.learning_rate = 1e-3    # Peak learning rate.
  c.teacher.momentum = 0.9          # SGD momentum (unused by Adam).
  c.teacher.weight_decay = 0.0      # L2 coefficient added to the gradient (PyTorch's weight_decay).
  c.teacher.schedule = 'constant'   # 'constant', 'cosine' (decay to 0 over the stage) or 'step'.
  c.teacher.decay_epochs = ()       # 'step' schedule: epochs after which lr is multiplied by
  c.teacher.decay_factor = 0.1      #   decay_factor.
  c.teacher.max_shift = 0           # Random translation of up to N pixels (augmentation); 0: none.
  c.teacher.flip = False            # Random horizontal flips (augmentation).
  c.teacher.max_train_examples = 0  # Use only the first N train examples; 0: the whole split.

  c.generator = ml_collections.ConfigDict()
  c.generator.latent_dim = 100      # Noise dimension (100 for MNIST, 1000 for SVHN/CIFAR-10).
  c.generator.width = 1.0           # Times the channel counts 128 and 64; 1: the authors'.
  c.generator.batch_size = 512      # Global batch: two halves of batch_size/2 for L_ds.
  c.generator.steps = 2400          # 20 epochs x 120 steps (the authors' code).
  c.generator.epoch_length = 120    # The loss references refresh at index 1 of each epoch.
  c.generator.optimizer = 'adam'
  c.generator.learning_rate = 1e-3
  c.generator.momentum = 0.9
  c.generator.weight_decay = 0.0
  c.generator.schedule = 'constant'
  c.generator.decay_epochs = ()     # In units of epoch_length steps.
  c.generator.decay_factor = 0.1
  c.generator.subpixel = True       # Exact sub-pixel form of upsample+conv (faster, same function).
  c.generator.checkpoint = ''       # A trained generator: the generator_variables directory of
                                    #   an earlier run with the same teacher, whose generator
                                    #   stage this run skips; empty: train one.
  c.generator.bn_prior_weight = 0.0  # Weight of the BatchNorm-statistics prior (DeepInversion)
                                    #   in the generator loss; needs a BatchNorm teacher.

  c.student = ml_collections.ConfigDict()
  c.student.model = 'lenet5_half'   # Classifier name in rdskd_jax.models.
  c.student.width = 1.0             # Times the model's published channel counts.
  c.student.batch_size = 512        # Fresh generated samples per step.
  c.student.steps = 120000          # 1000 epochs x 120 steps (the authors' code).
  c.student.epoch_length = 120      # Steps per epoch (the unit of decay_epochs).
  c.student.optimizer = 'adam'
  c.student.learning_rate = 2e-3
  c.student.momentum = 0.9
  c.student.weight_decay = 0.0
  c.student.schedule = 'constant'
  c.student.decay_epochs = ()
  c.student.decay_factor = 0.1
  c.student.temperature = 10.0      # KD temperature T.
  c.student.generator_batchnorm = 'running'  # The frozen generator's BatchNorm in the
  # student stage: 'running' statistics (inference mode, the authors' code) or each 'batch''s
  # own (as in the generator's training and DAFL's student updates). generated_agreement,
  # the diagnostics and samples.png sample the same way.
  c.student.reuse = 1               # Uses of each generated image, on average. 1: a fresh batch
  # every step (the authors'). R > 1: batch_size/R fresh images a step, the rest of the batch
  # drawn from a bank of earlier ones with the teacher's logits stored beside them (exact:
  # both networks are frozen and in inference mode); needs generator_batchnorm 'running'.
  # RDSKD's student stage reads it; the other methods' stages do not.
  c.student.bank_size = 0           # Images in the bank when reuse > 1; 0: 16 batches.
  c.student.eval_every = 0          # Log test accuracy every N steps (reporting only); 0: never.
  c.student.agreement_samples = 4096  # Generated samples for report's generated_agreement.

  # method='dafl' (Chen et al. 2019, DAFL's MNIST settings): generator and student trained
  # together for dafl.steps steps on one batch; generator.latent_dim, generator.bn_prior_weight,
  # student.model and student.eval_every still apply.
  c.dafl = ml_collections.ConfigDict()
  c.dafl.alpha = 0.1                # Weight of the activation loss L_a.
  c.dafl.beta = 5.0                 # Weight of the (log10) information entropy loss.
  c.dafl.generator_learning_rate = 0.2  # Adam.
  c.dafl.student_learning_rate = 2e-3   # Adam.
  c.dafl.temperature = 1.0          # DAFL's KD loss has no temperature (T = 1).
  c.dafl.batch_size = 512
  c.dafl.steps = 24000              # 200 epochs x 120 steps.

  # method='dfad' (Fang et al. 2019, the authors' DFAD_mnist.py defaults): each step makes
  # dfad.student_updates student steps on fresh generated batches, minimising the L1
  # distance of student and teacher logits, then one generator step maximising it.
  # generator.latent_dim, student.model and student.eval_every still apply.
  c.dfad = ml_collections.ConfigDict()
  c.dfad.generator_learning_rate = 1e-3  # Adam.
  c.dfad.student_learning_rate = 0.01    # SGD with momentum dfad.momentum.
  c.dfad.momentum = 0.9
  c.dfad.weight_decay = 1e-4        # L2 added to the student's gradient (PyTorch's).
  c.dfad.student_updates = 5        # Student steps per generator step.
  c.dfad.batch_size = 512
  c.dfad.steps = 2000               # 40 epochs x 50 iterations, each one generator step.

  # method='deepinversion' (Yin et al., CVPR 2020; the weights of the authors'
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

  # method='zskd' (Nayak et al., ICML 2019; its stated values: 1,500 iterations,
  # temperature 20, Dirichlet scales 1.0 and 0.1, 24,000 impressions for MNIST; Adam 0.01
  # and batch 100 from da2so/Zero-shot_Knowledge_Distillation_Pytorch): no generator. The
  # first zskd.steps steps each optimise one batch of data impressions from noise towards
  # soft targets drawn from the teacher's class similarity; the next zskd.steps steps
  # train the student on the complete set, student.steps / zskd.steps KD steps each, with
  # config.student's optimizer, batch size, schedule and temperature.
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
  return c


def load_beside(config_file: str, name: str) -> types.ModuleType:
  """The module `<name>.py` in the directory of `config_file`, loaded by its path.

  Config files are loaded by path (`--config=/any/where/mnist.py`), from any working
  directory, so `import configs.presets` would resolve only from the repository root; and a
  user's copy of `configs/` keeps working with its own `presets.py` beside it.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  module_name = f'_rdskd_config_{name}_{hashlib.sha1(path.encode()).hexdigest()[:12]}'
  if module_name not in sys.modules:
    if not os.path.exists(path):
      raise ConfigError(f'{config_file}: expected {path} beside it (shared presets)')
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
  return sys.modules[module_name]
