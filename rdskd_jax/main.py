"""Command line: python -m rdskd_jax.main --config=configs/mnist.py[:preset] --workdir=DIR

Parses flags and calls `rdskd_jax.train.train_and_evaluate`, the function that tests and
notebooks call too. Bad input ends with one line on stderr and exit status 2; a run stopped
by non-finite losses with exit status 3; SIGTERM checkpoints and exits with status 143 (run
the same command to resume). --verbose shows the traceback instead.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from rdskd_jax.errors import run_reporting_errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally :preset.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and report.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show tracebacks of errors.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Delete a run of another config found in --workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def _one_line(error: Exception) -> str:
  """The root cause of a flag or config error as one readable line."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  text = str(error.args[0]) if error.args else type(error).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, (KeyError, AttributeError)):
    return f'unknown config field {" ".join(lines)}'
  return lines[-1]


def parse_flags(argv):
  """absl's parsing, with the config file loaded now: a missing file or an unknown
  override field is one line on stderr and exit status 2 (--verbose: the traceback)."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.get('dataset')  # Loads the file and applies the overrides now.
    return rest
  except Exception as e:  # absl and ml_collections raise several types here.
    if '--verbose' in argv:
      raise
    print(f'error: bad command line: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # After the flags: a bad command line answers in one line, before TensorFlow (under tfds)
  # prints its start-up lines and JAX loads.
  from rdskd_jax import train
  run_reporting_errors(lambda: train.train_and_evaluate(
      _CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value), _VERBOSE.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
