"""The stage runner: restore, step, log, checkpoint and stop on preemption, for every
stage of a run and for a vmapped sweep group alike."""

import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rdskd_jax import metrics as metrics_lib
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.errors import NonFiniteError, Preempted


class SigtermFlag:
  """Within `with`, SIGTERM sets `.raised` instead of killing the process (main thread
  only; elsewhere, as in some notebook kernels, SIGTERM keeps its usual effect)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _stop_now(sigterm: SigtermFlag, done: int, log_every: int) -> bool:
  """Whether every process stops after step `done`.

  One process stops as soon as SIGTERM has arrived. Orbax saves are collective, so with
  several processes (of which SIGTERM may reach only some, or each at another step) all
  of them look at once, at the same steps (multiples of `log_every`), and stop together
  when any has received it.
  """
  if jax.process_count() == 1:
    return sigterm.raised
  if done % log_every:
    return False
  flags = multihost_utils.process_allgather(np.array(sigterm.raised))
  return bool(np.any(flags))


# config.steps_per_call 0: this many steps per compiled call, by platform. CPU: measured
# (benchmarks/README.md, "Fused step loops"); GPU and TPU: not yet measured, one call per
# default logging period.
DEFAULT_STEPS_PER_CALL = {'cpu': 10, 'gpu': 20, 'tpu': 20}


def steps_per_call(config) -> int:
  """Steps one compiled call of a stage runs (config.steps_per_call, 0: the platform's)."""
  return config.steps_per_call or DEFAULT_STEPS_PER_CALL.get(jax.default_backend(), 1)


def fuse_steps(step_fn, num_steps: int):
  """`num_steps` steps of `step_fn` as one function of the same signature (a lax.scan),
  returning the last step's metrics. Each step draws its noise from (key, state step), so
  the steps are those of `num_steps` calls."""
  if num_steps == 1:
    return step_fn

  def fused(state, frozen, root_key, *, axis_name=None):
    def body(carry, _):
      return step_fn(carry, frozen, root_key, axis_name=axis_name)
    state, metrics = jax.lax.scan(body, state, None, length=num_steps)
    return state, jax.tree.map(lambda m: m[-1], metrics)
  return fused


def call_length(step: int, total_steps: int, most: int, periods) -> int:
  """Steps of the call after `step`: at most `most`, ending at the next multiple of each
  period (logging, reporting, checkpoints) or at the stage's end, so every event falls
  where it does with one step per call, and a resumed run calls as an uninterrupted one."""
  length = min(most, total_steps - step)
  for period in periods:
    if period:
      length = min(length, period - step % period)
  return length


def run_stage(stage, config, workdir, par, state, frozen, step_fn, total_steps, log,
              root_key, batches=None, report_every=0, report_fn=None, derived=None):
  """Runs a stage from its latest checkpoint in `workdir` to `total_steps`; returns
  (host state, seconds).

  `par` places the step (parallel.DataParallel, or parallel.RunBatch for a group of runs
  stacked along a leading axis, whose metrics then carry that axis). `root_key` is the
  stage's key (stacked for a RunBatch). `batches(step)`, when given, returns the host
  batch arrays of a step. Every `report_every` steps, `report_fn(host_state)` adds metrics
  to that step's log line; it is for reporting only: nothing in training reads what it
  returns, and its time is not counted in the stage's seconds. Stages without host
  batches run `steps_per_call(config)` steps per compiled call (`fuse_steps`).
  `derived`, when given, is (names, fn): state entries that checkpoints leave out because
  `fn(state, frozen, root_key, axis_name) -> (state, {})` makes them again from the rest
  of the state (the student's bank, from the step); fn runs once as the stage starts or
  resumes, and its time counts in the stage's seconds.
  """
  manager = workdir_lib.checkpoint_manager(workdir, stage)
  names, rebuild = derived or ((), None)
  kept = lambda tree: {k: v for k, v in tree.items() if k not in names}
  restored, start = workdir_lib.restore_latest_readable(manager, kept(state), stage)
  state = dict(state, **restored)
  log.resume(stage, start)
  most = 1 if batches is not None else steps_per_call(config)
  periods = (config.log_every, config.checkpoint_every, report_every)
  programs = {}

  def program(length):
    if length not in programs:  # At most a few lengths: the period remainders.
      programs[length] = par.wrap(fuse_steps(step_fn, length),
                                  num_batch_args=0 if batches is None else 2)
    return programs[length]

  device_state, device_frozen = par.replicate(state), par.replicate(frozen)
  runs = getattr(par, 'num_runs', 0)
  progress = metrics_lib.Progress(f'{stage} x{runs}' if runs else stage, start, total_steps)
  t0, reporting_seconds = time.perf_counter(), 0.0
  if rebuild is not None:
    device_state, _ = par.wrap(rebuild)(device_state, device_frozen, root_key)
  step = start
  with SigtermFlag() as sigterm:
    while step < total_steps:
      length = call_length(step, total_steps, most, periods)
      args = () if batches is None else tuple(par.split_batch(b) for b in batches(step))
      device_state, metrics = program(length)(device_state, device_frozen, root_key, *args)
      done = step = step + length
      report_now = report_every and done % report_every == 0
      if done % config.log_every == 0 or done == total_steps or report_now:
        metrics = {k: np.asarray(v) for k, v in par.to_host(metrics).items()}
        nonfinite = par.to_host(device_state['nonfinite'])
        metrics['skipped_steps'] = np.asarray(nonfinite['total'])
        streak = np.asarray(nonfinite['streak'])
        if streak.max() >= config.max_bad_steps:
          which = f'run {int(streak.argmax())} of this group: ' if streak.ndim else ''
          raise NonFiniteError(
              f'{stage}: {which}{int(streak.max())} consecutive steps up to step {done} had '
              f'a non-finite loss or gradient and were skipped (config.max_bad_steps='
              f'{config.max_bad_steps}); the last checkpoint is step '
              f'{manager.latest_step()}. Try a lower learning rate.')
        if done == total_steps and 2 * metrics['skipped_steps'].max() > total_steps:
          which = (f'run {int(metrics["skipped_steps"].argmax())} of this group: '
                   if metrics['skipped_steps'].ndim else '')
          raise NonFiniteError(
              f'{stage}: {which}{int(metrics["skipped_steps"].max())} of its {total_steps} '
              'steps had a non-finite loss, gradient or update and were skipped; its result '
              'is not a trained network. Try a lower learning rate.')
        if report_now:
          t_report = time.perf_counter()
          metrics.update(report_fn(par.to_host(device_state)))
          reporting_seconds += time.perf_counter() - t_report
        log.write(stage, done, metrics)
        progress.show(done, metrics)
      stop = done < total_steps and _stop_now(sigterm, done, config.log_every)
      if done % config.checkpoint_every == 0 or done == total_steps or stop:
        _save(manager, stage, done, par.to_host(kept(device_state)))
      if stop:
        _wait(manager, stage)
        log.flush()
        raise Preempted(f'{stage}: stopped by SIGTERM after step {done}/{total_steps}, which '
                        'is checkpointed; run the same command again to resume')
  _wait(manager, stage)
  log.flush()
  return par.to_host(device_state), time.perf_counter() - t0 - reporting_seconds


def _save(manager, stage, step, state):
  """Starts saving a checkpoint (asynchronously: an earlier save's failure surfaces here)."""
  try:
    manager.save(step, args=ocp.args.StandardSave(state))
  except (OSError, ValueError) as e:  # Orbax reports failed writes as ValueError.
    raise workdir_lib.storage_error(f'{stage} checkpoints (by step {step})',
                                    str(manager.directory), e) from None


def _wait(manager, stage):
  try:
    manager.wait_until_finished()
  except (OSError, ValueError) as e:
    raise workdir_lib.storage_error(f'{stage} checkpoints', str(manager.directory),
                                    e) from None
