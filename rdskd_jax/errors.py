"""The errors a run reports to its user as one line (rdskd_jax.main prints them)."""


class ConfigError(ValueError):
  """A config value that cannot run; the message names the field, value and expectation."""


class DataError(Exception):
  """Missing, unbuildable or corrupted data; the message is meant for the user."""


class RunStopped(Exception):
  """A run that stopped before its end on purpose; the message says why and what next."""


class NonFiniteError(RunStopped):
  """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(RunStopped):
  """SIGTERM arrived; the state of the last finished step is checkpointed."""
