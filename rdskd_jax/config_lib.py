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

from rdskd_jax import methods
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
  c.method = 'rdskd'                # A name in rdskd_jax.methods.METHODS; 'rdskd': the paper's
                                    #   (a generator, then a student distilled on its samples).
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
  c.test_split = 'test'             # The split reported on. To choose settings without the
                                    #   test split: a slice of the train split the teacher does
                                    #   not see, 'train[50000:]' with teacher.max_train_examples
                                    #   = 50000 (a validation slice).
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

  methods.add_config_blocks(c)  # c.dafl, c.dfad, ...: each method's own fields.
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
