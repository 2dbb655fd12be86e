"""What a run logs: metrics.jsonl, TensorBoard event files, and progress lines."""

import json
import os
import sys
import time
from typing import Dict

import numpy as np

from rdskd_jax import parallel
from rdskd_jax.errors import DataError


def read_rows(path: str):
  """The rows of a metrics.jsonl. A last line cut short (a crash or a full disk during an
  append) is dropped with a note on stderr; a damaged line before it is a DataError."""
  return _read_rows_and_count(path)[0]


def _read_rows_and_count(path: str):
  """(read_rows(path), the number of non-empty lines the file holds)."""
  with open(path) as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise DataError(f'{path}: line {number} of {len(lines)} is not JSON ({line[:60]!r}); '
                        'delete the damaged lines or the file') from None
      say(f'note: {path}: dropped its last line, cut short ({line[:60]!r})')
  return rows, len(lines)


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard event files in
  `<workdir>/tensorboard` (`EventWriter`: scalars as `stage/name`, and images), written
  by process 0. Lines of a stage past the step it resumes from are dropped from
  metrics.jsonl, so a resumed run leaves the file an uninterrupted run writes (TensorBoard
  shows the re-run steps twice).

  Metrics of a batch of runs (a vmapped sweep group) have a leading run axis: each run
  gets its own line, with a `run` field, and TensorBoard the mean over runs.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if parallel.is_main_process():
      self.writer = _tensorboard_writer(os.path.join(os.path.abspath(workdir), 'tensorboard'))

  def resume(self, stage: str, step: int) -> None:
    if not parallel.is_main_process() or not os.path.exists(self.path):
      return
    rows, lines = _read_rows_and_count(self.path)
    keep = [r for r in rows if r['stage'] != stage or r['step'] <= step]
    if len(keep) != lines:
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
      os.replace(self.path + '.tmp', self.path)

  def write(self, stage: str, step: int, metrics: Dict[str, np.ndarray]) -> None:
    """One line per run: `metrics` values are numbers, or arrays with one entry per run."""
    if not parallel.is_main_process():
      return
    arrays = {k: np.asarray(v) for k, v in metrics.items()}
    runs = max((v.shape[0] for v in arrays.values() if v.ndim), default=None)
    if runs is None:
      rows = [{'stage': stage, 'step': step, **{k: v.item() for k, v in arrays.items()}}]
    else:
      rows = [{'stage': stage, 'step': step, 'run': r,
               **{k: (v[r] if v.ndim else v).item() for k, v in arrays.items()}}
              for r in range(runs)]
    with open(self.path, 'a') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
    if self.writer is not None:
      self.writer.write_scalars(step, {f'{stage}/{k}': float(np.mean(v))
                                       for k, v in arrays.items()})

  def write_images(self, stage: str, step: int, images: Dict[str, np.ndarray]) -> None:
    """TensorBoard images, each (H, W, C) in [0, 1]."""
    if self.writer is not None:
      self.writer.write_images(step, {f'{stage}/{k}': v[None] for k, v in images.items()})

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    """Closes the event file. A run's closures keep its log alive in a reference cycle,
    so without this each run in one Python (a notebook's) left its file open."""
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def __enter__(self) -> 'MetricsLog':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _tensorboard_writer(logdir: str):
  """`EventWriter`; without tensorboard, None after a note."""
  try:
    return EventWriter(logdir)
  except ImportError:
    say('note: tensorboard cannot be imported, so no TensorBoard files are written; '
        'metrics.jsonl holds every logged value')
    return None


class EventWriter:
  """TensorBoard scalars and images in an event file (TFRecords of `Event` protos), written
  with tensorboard's protos and record format on a plain file. Neither TensorFlow nor its
  file layer is imported: importing TensorFlow costs seconds in every Python a run starts
  (tensorboard's own EventFileWriter and clu's writers import it where it is installed),
  and an accelerator image may lack it."""

  def __init__(self, logdir: str):
    import socket
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    os.makedirs(logdir, exist_ok=True)
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    # TensorBoard reads every file named events.out.tfevents.* in the directory; the time
    # and host in the name keep a resumed run's file apart from the one before.
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
    self._file = RecordWriter(open(os.path.join(logdir, name), 'wb'))
    self._file.write(self._event(wall_time=time.time(),
                                 file_version='brain.Event:2').SerializeToString())

  def _add(self, step: int, values) -> None:
    self._file.write(self._event(step=int(step), wall_time=time.time(),
                                 summary=self._summary(value=values)).SerializeToString())
    self._file.flush()  # TensorBoard shows a running job's steps, not only finished stages'.

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    self._add(step, [self._summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
    """Each image (1, H, W, C) in [0, 1], C 1 or 3, stored as PNG."""
    import io
    from PIL import Image
    values = []
    for tag, batch in images.items():
      pixels = np.clip(np.rint(np.asarray(batch[0], np.float64) * 255), 0, 255).astype(np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, 'PNG')
      values.append(self._summary.Value(tag=tag, image=self._summary.Image(
          height=pixels.shape[0], width=pixels.shape[1], colorspace=pixels.shape[2],
          encoded_image_string=buffer.getvalue())))
    self._add(step, values)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class Progress:
  """Progress lines on stderr: step, metrics (the mean over runs of a batch), steps/s
  and ETA."""

  def __init__(self, stage: str, start: int, total: int):
    self.stage, self.start, self.total = stage, start, total
    self.t0 = time.perf_counter()

  def show(self, step: int, metrics: Dict[str, np.ndarray]) -> None:
    if not parallel.is_main_process():
      return
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    parts = ' '.join(f'{k}={float(np.mean(v)):.4g}' for k, v in metrics.items())
    print(f'[{self.stage}] step {step}/{self.total} {parts} {rate:.2f} steps/s '
          f'ETA {eta:.0f}s', file=sys.stderr, flush=True)


def say(line: str) -> None:
  """A line on stderr from process 0."""
  if parallel.is_main_process():
    print(line, file=sys.stderr, flush=True)
