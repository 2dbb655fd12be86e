"""The input pipeline: real splits through tfds, normalisation, and the teacher's
augmentation.

Only two readers of real data exist: `load_split(config, 'train')` for the teacher stage
and `load_split(config, 'test')` for evaluation. Nothing else in the package touches it. A
teacher from outside reads no train split; with `config.dataset` '' nothing is read.
A dataset that is not in the tfds data_dir is built by `prepare.ensure_prepared`.
"""

import copy
import json
import os

import jax
import numpy as np
import tensorflow_datasets as tfds

from rdskd_jax.errors import ConfigError, DataError
from rdskd_jax.prepare import default_data_dir, ensure_prepared


def dataset_info(config):
  """(num_classes, channels) of the configured dataset, from tfds metadata."""
  num_classes, shape = _image_metadata(config)
  return num_classes, shape[-1]


def _image_metadata(config):
  """(num_classes, image shape (H, W, C), None where sizes vary) from tfds metadata."""
  data_dir = config.data_dir or default_data_dir()
  ensure_prepared(config.dataset, data_dir)
  info = tfds.builder(config.dataset, data_dir=data_dir).info
  keys = info.supervised_keys
  if not keys or len(keys) != 2:
    raise DataError(f'dataset {config.dataset!r} has no (image, label) supervised keys; '
                    'expected an image classification dataset')
  image, label = info.features[keys[0]], info.features[keys[1]]
  shape = getattr(image, 'shape', None)
  if not hasattr(label, 'num_classes') or not shape or len(shape) != 3:
    raise DataError(f'dataset {config.dataset!r}: features {keys[0]!r} / {keys[1]!r} are not an '
                    'image and a class label; expected an image classification dataset')
  return label.num_classes, tuple(shape)


def channel_statistics(config, max_examples: int = 0):
  """Per-channel (mean, std) of the train split's pixels scaled to [0, 1]."""
  split = f'train[:{max_examples}]' if max_examples else 'train'
  images, _ = _read_split(config, split)
  pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return tuple(float(v) for v in pixels.mean(0)), tuple(float(v) for v in pixels.std(0))


def resolve_dataset_fields(config, workdir: str, teacher_from_outside: bool = False):
  """The config with its dataset-dependent fields filled in: `image_size` 0 becomes the
  dataset's image size, and empty `mean`/`std` the train split's per-channel statistics,
  computed once and cached in `<workdir>/normalization.json`. Returns (config, notes),
  `notes` saying where each value came from (for report.json).

  With `dataset` '' every field comes from the config and no data is opened. A teacher
  from outside reads no train split, so its normalisation must be given."""

  config = copy.deepcopy(config)
  if not config.dataset:
    return config, {'num_classes': config.num_classes, 'channels': config.channels,
                    'source': "the config (dataset '': no real data read)"}
  if teacher_from_outside and not config.mean:
    raise ConfigError('config.mean=(): a teacher from outside reads no train split, so its '
                    'normalisation is not computed; set config.mean and config.std to the '
                    "teacher's training normalisation")
  num_classes, (height, width, channels) = _image_metadata(config)
  for field, value in (('num_classes', num_classes), ('channels', channels)):
    if config[field] not in (0, value):
      raise ConfigError(f'config.{field}={config[field]}: dataset {config.dataset!r} has '
                      f'{value}; expected 0 or {value}')
  notes = {'num_classes': num_classes, 'channels': channels}
  if config.image_size == 0:
    if height is None or height != width or height % 4:
      raise DataError(f'dataset {config.dataset!r} has images of shape {height}x{width}; '
                      'config.image_size=0 needs square images with a side divisible by 4: '
                      'set config.image_size (a multiple of 4) to resize them')
    config.image_size = height
    notes['image_size'] = f'{height} (from the dataset)'
  if len(config.mean) != len(config.std):
    raise DataError(f'config.mean={config.mean!r}, config.std={config.std!r}: expected one value '
                    'per channel each, or both empty')
  if not config.mean:
    cache = os.path.join(workdir, 'normalization.json')
    try:  # A cache: a damaged one is computed again.
      with open(cache) as f:
        stats = json.load(f)
    except (OSError, ValueError):
      mean, std = channel_statistics(config)
      stats = {'dataset': config.dataset, 'split': 'train', 'mean': mean, 'std': std}
      if jax.process_index() == 0:
        with open(cache + '.tmp', 'w') as f:
          json.dump(stats, f, indent=2)
        os.replace(cache + '.tmp', cache)
    if stats.get('dataset') != config.dataset:
      raise DataError(f'{cache} holds statistics of {stats.get("dataset")!r}, not of '
                      f'{config.dataset!r}; delete it')
    config.mean, config.std = tuple(stats['mean']), tuple(stats['std'])
    notes['normalization'] = 'computed from the train split (normalization.json)'
  if len(config.mean) != channels:
    raise DataError(f'config.mean={config.mean!r}: {len(config.mean)} values, but dataset '
                    f'{config.dataset!r} has {channels} channels; set mean and std per channel, '
                    'or leave both empty to compute them')
  return config, notes


def normalize(images_uint8: np.ndarray, config) -> np.ndarray:
  """uint8 NHWC -> float32 NHWC, resized to image_size (bilinear) and standardised."""
  x = images_uint8.astype(np.float32) / 255.0
  size = config.image_size
  if x.shape[1:3] != (size, size):
    x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'bilinear'))
  mean = np.asarray(config.mean, np.float32)
  std = np.asarray(config.std, np.float32)
  return (x - mean) / std


def load_split(config, split: str, max_examples: int = 0, per_process: bool = False):
  """(images float32 NHWC normalised, labels int32) of a whole split, in tfds order.

  `per_process`: in a multi-process run, only this process's share of the split
  (`tfds.split_for_jax_process`); evaluation sums the shares' counts.
  """
  data_dir = config.data_dir or default_data_dir()
  ensure_prepared(config.dataset, data_dir)
  if max_examples:
    split = f'{split}[:{max_examples}]'
  if per_process and jax.process_count() > 1:
    split = tfds.split_for_jax_process(split)
  images, labels = _read_split(config, split)
  return normalize(images, config), labels.astype(np.int32)


def _read_split(config, split: str):
  """(uint8 images, labels) of a whole tfds split, in order, read in chunks (tfds's
  batch_size=-1 would size one batch from split metadata, which not every source has)."""
  ds = tfds.load(config.dataset, split=split, data_dir=config.data_dir or default_data_dir(),
                 as_supervised=True, batch_size=4096, shuffle_files=False, download=False)
  chunks = list(tfds.as_numpy(ds))
  if not chunks:
    raise DataError(f'split {split!r} of dataset {config.dataset!r} is empty')
  return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def random_flip(rng: np.random.Generator, images, enabled: bool):
  """Mirrors each image left-right with probability 1/2."""
  if not enabled:
    return images
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def random_shift(rng: np.random.Generator, images, max_shift: int, fill):
  """Translates each image by up to `max_shift` pixels per axis, filling with `fill`
  (one value per channel)."""
  if max_shift == 0:
    return images
  n, h, w, c = images.shape
  m = max_shift
  padded = np.empty((n, h + 2 * m, w + 2 * m, c), images.dtype)
  padded[...] = fill
  padded[:, m:m + h, m:m + w] = images
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
  rows = (dy[:, None] + np.arange(h))[:, :, None]
  cols = (dx[:, None] + np.arange(w))[:, None, :]
  return padded[np.arange(n)[:, None, None], rows, cols]
