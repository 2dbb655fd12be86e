"""RDSKD on MNIST: LeNet-5 teacher -> LeNet-5-half student.

Presets (the string after the colon):
  python -m rdskd_jax.main --config=configs/mnist.py --workdir=W        # paper settings
  python -m rdskd_jax.main --config=configs/mnist.py:cpu --workdir=W    # 2-core CPU budget
  python -m rdskd_jax.main --config=configs/mnist.py:smoke --workdir=W  # seconds, for tests
"""

import ml_collections


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset                 # Which preset built this config (recorded in report.json).
  c.dataset = 'mnist'               # tfds name of an image classification dataset.
  c.data_dir = ''                   # tfds data_dir; empty: TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.image_size = 32                 # Images are resized to image_size x image_size.
  c.mean = (0.1307,)                # Per-channel normalisation mean (the authors' MNIST values).
  c.std = (0.3081,)                 # Per-channel normalisation std.
  c.seed = 0                        # Root of every random stream of the run.
  c.parallel = 'pmap'               # 'pmap', 'shard_map' or 'none' (plain jit, one device).
  c.num_devices = 0                 # Devices to use (the first N); 0: all, of all processes.
  c.distributed = False             # jax.distributed.initialize() first (multi-host; see README).
  c.dtype = 'float32'               # Compute dtype, 'float32' or 'bfloat16' (params, losses f32).
  c.checkpoint_every = 120          # Steps between checkpoints in every stage.
  c.log_every = 20                  # Steps between metrics.jsonl lines and progress lines.
  c.max_bad_steps = 20              # Stop after N consecutive steps with non-finite loss/grads.
  c.eval_batch_size = 1000          # Batch size of test-set evaluation (no effect on results).

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = 'lenet5'        # Classifier name in rdskd_jax.models.
  c.teacher.checkpoint = ''         # Orbax checkpoint of trained teacher params; empty: train one.
  c.teacher.batch_size = 256        # Real-data batch size (DAFL's teacher-train.py).
  c.teacher.epochs = 10             # Passes over the train split.
  c.teacher.learning_rate = 1e-3    # Adam peak learning rate.
  c.teacher.schedule = 'constant'   # 'constant' or 'cosine' (decay to 0 over the stage).
  c.teacher.max_shift = 0           # Random translation of up to N pixels (augmentation); 0: none.
  c.teacher.max_train_examples = 0  # Use only the first N train examples; 0: the whole split.

  c.generator = ml_collections.ConfigDict()
  c.generator.latent_dim = 100      # Noise dimension (100 for MNIST, as in DAFL/RDSKD).
  c.generator.batch_size = 512      # Global batch: two halves of batch_size/2 for L_ds.
  c.generator.steps = 2400          # 20 epochs x 120 steps (the authors' code).
  c.generator.epoch_length = 120    # The loss references refresh at index 1 of each epoch.
  c.generator.learning_rate = 1e-3  # Adam learning rate.
  c.generator.subpixel = True       # Exact sub-pixel form of upsample+conv (faster, same function).

  c.student = ml_collections.ConfigDict()
  c.student.model = 'lenet5_half'   # Classifier name in rdskd_jax.models.
  c.student.batch_size = 512        # Fresh generated samples per step.
  c.student.steps = 120000          # 1000 epochs x 120 steps (the authors' code).
  c.student.learning_rate = 2e-3    # Adam peak learning rate.
  c.student.schedule = 'constant'   # 'constant' or 'cosine' (decay to 0 over the stage).
  c.student.temperature = 10.0      # KD temperature T.
  c.student.eval_every = 0          # Log test accuracy every N steps (reporting only); 0: never.
  c.student.agreement_samples = 4096  # Generated samples for report's generated_agreement.

  if preset == 'paper':
    pass
  elif preset == 'cpu':
    # Teacher recipe sized on a validation slice of the train split (last 10k images).
    c.teacher.batch_size = 128
    c.teacher.learning_rate = 2e-3
    c.teacher.epochs = 7
    c.teacher.schedule = 'cosine'
    c.teacher.max_shift = 2
    c.generator.batch_size = 256
    c.generator.steps = 240
    c.generator.epoch_length = 40
    c.student.batch_size = 256
    c.student.steps = 3000
    c.student.learning_rate = 4e-3
    c.student.schedule = 'cosine'
    c.student.eval_every = 500
    c.checkpoint_every = 200
  elif preset == 'smoke':
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
    c.checkpoint_every = 4
    c.log_every = 2
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/mnist.py; expected 'paper', 'cpu' or 'smoke'")
  return c
