"""The errors a run reports to its user as one line, and `run_reporting_errors`, which the
command lines call to print them and exit with their status."""

import errno
import logging
import os
import sys

from absl import logging as absl_logging


class ConfigError(ValueError):
  """A config value that cannot run; the message names the field, value and expectation."""


class DataError(Exception):
  """Missing, unbuildable or corrupted data; the message is meant for the user."""


class StorageError(Exception):
  """Writing to the workdir failed (a full disk, a size limit, a vanished mount)."""


class RunStopped(Exception):
  """A run that stopped before its end on purpose; the message says why and what next."""


class NonFiniteError(RunStopped):
  """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(RunStopped):
  """SIGTERM arrived; the state of the last finished step is checkpointed."""


class _OneLineLogs(logging.Filter):
  """Log records keep their line, not their traceback; Orbax's are dropped: a failed
  checkpoint write reaches the user as the run's own error line, which Orbax's own lines
  (four of about 400 characters on a full disk) would bury. So is asyncio's report of an
  Orbax write task whose error nobody read: it comes when the task is collected, after
  the run's error line, and names the same failed write."""

  def filter(self, record):
    orbax = f'{os.sep}orbax{os.sep}'
    if orbax in record.pathname or (record.name == 'asyncio' and orbax in record.getMessage()):
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _unraisable_in_one_line(unraisable) -> None:
  """Errors Python ignores (in callbacks, finalizers) as one line, not a traceback. After a
  failed checkpoint write, Orbax's storage callbacks find their event loop closed: that one
  says nothing the run's own error line does not, and is dropped."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return
  print(f'note: ignored {type(error).__name__}: {error}', file=sys.stderr)


def run_reporting_errors(run, verbose: bool = False):
  """Returns `run()`; an error the user can act on ends the process with one line on
  stderr and its status: 2 bad input or a failed write, 3 a run stopped by non-finite
  steps, 143 SIGTERM (checkpointed). `verbose` keeps tracebacks, INFO logs and Orbax's."""
  if verbose:
    return run()
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint at INFO.
  absl_logging.get_absl_handler().addFilter(_OneLineLogs())
  sys.unraisablehook = _unraisable_in_one_line
  try:
    return run()
  except (ConfigError, DataError, StorageError, RunStopped) as e:
    preempted = isinstance(e, Preempted)
    print(f'{"stopped" if preempted else "error"}: {e}', file=sys.stderr)
    sys.exit(143 if preempted else 3 if isinstance(e, RunStopped) else 2)
  except OSError as e:  # The filesystem: a vanished mount, a full disk outside Orbax.
    where = f' ({e.filename})' if e.filename else ''
    advice = ('the disk is full: free space, then run the same command again to resume'
              if e.errno == errno.ENOSPC else
              'fix that, then run the same command again to resume')
    print(f'error: {e.strerror or e}{where}; {advice}', file=sys.stderr)
    sys.exit(2)
