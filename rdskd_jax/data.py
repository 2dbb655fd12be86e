"""The input pipeline: real splits through tfds, normalisation, and the teacher's
augmentation.

Only two readers of real data exist: `load_split(config, 'train')` for the teacher stage
and `load_split(config, config.test_split)` for evaluation (the test split, or a slice of
the train split that the teacher did not see, for choosing settings). Nothing else in the
package touches it. A
teacher from outside reads no train split; with `config.dataset` '' nothing is read.
A dataset that is not in the tfds data_dir is built by `prepare.ensure_prepared`.

A data_dir holding `<dataset>/arrays/` is read from those NumPy files instead, without
tfds or TensorFlow: the way to carry a dataset to a machine that has neither (an
accelerator image, say). They are written by

    python -m rdskd_jax.data mnist --export=DIR [--data_dir=TFDS_DIR]

(the dataset built offline first where needed); point config.data_dir at DIR to read them.
"""

import argparse
import copy
import json
import os
import re
import sys

import jax
import numpy as np

from rdskd_jax.errors import ConfigError, DataError
from rdskd_jax.prepare import default_data_dir, ensure_prepared


def dataset_info(config):
  """(num_classes, channels) of the configured dataset, from tfds metadata."""
  num_classes, shape = _image_metadata(config)
  return num_classes, shape[-1]


def _arrays(config):
  """`ArraysDir` of the configured dataset, or None where the data_dir has none."""
  return ArraysDir.find(config.data_dir or default_data_dir(), config.dataset)


_SPLIT = re.compile(r'(\w+)(?:\[(\d*):(\d*)\])?')


def split_range(split: str):
  """(name, first index, end index or None for the split's end) of a split written
  'NAME', 'NAME[:N]', 'NAME[N:]' or 'NAME[N:M]'; None for any other form."""
  match = _SPLIT.fullmatch(split)
  if not match:
    return None
  name, start, stop = match.groups()
  return name, int(start or 0), int(stop) if stop else None


def first_examples(split: str, count: int) -> str:
  """The split string for the first `count` examples of `split` (0: all of it)."""
  parsed = split_range(split)
  if not count or parsed is None:
    return f'{split}[:{count}]' if count else split
  name, start, stop = parsed
  stop = start + count if stop is None else min(stop, start + count)
  return f'{name}[{start}:{stop}]' if start else f'{name}[:{stop}]'


class ArraysDir:
  """A dataset exported as NumPy arrays: `<data_dir>/<dataset>/arrays/` holding info.json
  (class count, image shape, examples per split) and `<split>.npz` (`images` uint8 NHWC,
  `labels`) in tfds order. Read without tfds or TensorFlow."""

  SPLITS = ('train', 'test')  # The splits the pipeline reads.

  def __init__(self, path: str):
    self.path = path
    info_path = os.path.join(path, 'info.json')
    try:
      with open(info_path) as f:
        info = json.load(f)
      self.num_classes, self.shape = int(info['num_classes']), tuple(info['shape'])
      self.examples = {k: int(v) for k, v in info['examples'].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f'{info_path}: not an arrays export ({type(e).__name__}: {e}); '
                      'export it again: python -m rdskd_jax.data NAME --export=DIR') from None

  @classmethod
  def find(cls, data_dir: str, dataset: str):
    path = os.path.join(data_dir, dataset, 'arrays')
    return cls(path) if os.path.exists(os.path.join(path, 'info.json')) else None

  def read(self, split):
    """(uint8 images, labels) of `split`: 'NAME', 'NAME[:N]', 'NAME[N:]', 'NAME[N:M]', or
    (any of those, process index, process count) for that process's share, divided as
    `tfds.even_splits` does (the first shares one example longer where the count does
    not divide)."""
    share = None
    if isinstance(split, tuple):
      split, share = split[0], split[1:]
    parsed = split_range(split)
    if parsed is None:
      raise DataError(f'split {split!r}: exported arrays take NAME, NAME[:N], NAME[N:] or '
                      'NAME[N:M]')
    name, start, stop = parsed
    if name not in self.examples:
      raise DataError(f'split {name!r} is not in {self.path} (it holds '
                      f'{", ".join(sorted(self.examples))})')
    with np.load(os.path.join(self.path, f'{name}.npz')) as f:
      images, labels = f['images'], f['labels']
    if len(images) != self.examples[name] or len(labels) != len(images):
      raise DataError(f'{self.path}/{name}.npz holds {len(images)} images and {len(labels)} '
                      f'labels; info.json says {self.examples[name]}: export it again')
    images, labels = images[start:stop], labels[start:stop]
    if share is not None:
      index, count = share
      parts = np.array_split(np.arange(len(images)), count)[index]
      images, labels = images[parts[0]:parts[-1] + 1], labels[parts[0]:parts[-1] + 1]
    if not len(images):
      raise DataError(f'split {split!r} of {self.path} is empty')
    return images, labels


def export_arrays(dataset: str, data_dir: str, out_dir: str) -> str:
  """Writes `<out_dir>/<dataset>/arrays/` from the tfds dataset in `data_dir` (built
  offline first where needed); returns that path."""
  import ml_collections
  config = ml_collections.ConfigDict({'dataset': dataset, 'data_dir': data_dir})
  num_classes, shape = _image_metadata(config)
  if None in shape:
    raise DataError(f'dataset {dataset!r} has images of varying sizes {shape}; '
                    'only fixed-size images can be exported as arrays')
  path = os.path.join(out_dir, dataset, 'arrays')
  os.makedirs(path, exist_ok=True)
  examples = {}
  for split in ArraysDir.SPLITS:
    images, labels = _read_split(config, split)
    examples[split] = len(images)
    np.savez_compressed(os.path.join(path, f'{split}.tmp.npz'), images=images, labels=labels)
    os.replace(os.path.join(path, f'{split}.tmp.npz'), os.path.join(path, f'{split}.npz'))
  info = {'dataset': dataset, 'num_classes': num_classes, 'shape': list(shape),
          'examples': examples, 'source': f'tfds data_dir {os.path.abspath(data_dir)}'}
  with open(os.path.join(path, 'info.json'), 'w') as f:  # Last: it marks the export done.
    json.dump(info, f, indent=2)
  return path


def _image_metadata(config):
  """(num_classes, image shape (H, W, C), None where sizes vary) from tfds metadata."""
  arrays = _arrays(config)
  if arrays is not None:
    return arrays.num_classes, arrays.shape
  import tensorflow_datasets as tfds  # Only here and in _read_split: arrays need neither.
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
  images, _ = _read_split(config, first_examples('train', max_examples))
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
  arrays = _arrays(config)
  notes = {'num_classes': num_classes, 'channels': channels,
           'read_from': (f'NumPy arrays in {arrays.path}' if arrays else
                         f'tfds data_dir {config.data_dir or default_data_dir()}')}
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
  (`tfds.split_for_jax_process`, or the same even division of exported arrays);
  evaluation sums the shares' counts.
  """
  split = first_examples(split, max_examples)
  if per_process and jax.process_count() > 1:
    split = (split, jax.process_index(), jax.process_count())
  images, labels = _read_split(config, split)
  return normalize(images, config), labels.astype(np.int32)


def _read_split(config, split):
  """(uint8 images, labels) of a whole split, in order: from exported arrays where the
  data_dir has them, else from tfds in chunks (tfds's batch_size=-1 would size one batch
  from split metadata, which not every source has). `split` is a tfds split string, or
  (split, process index, process count) for one process's share."""
  arrays = _arrays(config)
  if arrays is not None:
    return arrays.read(split)
  import tensorflow_datasets as tfds
  ensure_prepared(config.dataset, config.data_dir or default_data_dir())
  if isinstance(split, tuple):  # The share named, not read from jax: the same in a test.
    split = tfds.split_for_jax_process(split[0], process_index=split[1], process_count=split[2])
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m rdskd_jax.data',
      description='Exports a dataset (built offline first where needed) as NumPy arrays '
                  'that the input pipeline reads without tfds or TensorFlow.')
  parser.add_argument('name', help='tfds dataset name')
  parser.add_argument('--export', required=True, metavar='DIR',
                      help='write the train and test splits to DIR/NAME/arrays/; read them '
                           'with data_dir=DIR')
  parser.add_argument('--data_dir', default='', help='tfds data_dir (default: tfds default)')
  args = parser.parse_args(argv)
  try:
    path = export_arrays(args.name, args.data_dir or default_data_dir(), args.export)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{args.name} exported to {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
