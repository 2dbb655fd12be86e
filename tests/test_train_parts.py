"""Pieces of the pipeline: augmentation, the per-device noise split, the metrics log."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from rdskd_jax import train


def test_random_shift_moves_content_and_fills_the_border():
  images = np.zeros((64, 8, 8, 1), np.float32)
  images[:, 3:5, 3:5] = 1.0
  shifted = train.random_shift(np.random.default_rng(0), images, 2, np.float32([-0.5]))
  assert shifted.shape == images.shape
  assert np.all((shifted == 1.0).sum(axis=(1, 2, 3)) == 4)  # The block stays whole.
  assert set(np.unique(shifted)) <= {-0.5, 0.0, 1.0}  # Only content, background and fill.
  assert np.any(shifted == -0.5)
  assert len({tuple(np.argwhere(s[..., 0] == 1.0)[0]) for s in shifted}) > 10
  assert train.random_shift(np.random.default_rng(0), images, 0, 0.0) is images


def test_local_noise_slices_pair_up_across_devices():
  key, batch, devices = jax.random.key(3), 16, 4
  whole = train._local_noise(key, batch, 5, None)
  local = jax.vmap(lambda _: train._local_noise(key, batch, 5, 'd'), axis_name='d')(
      jnp.arange(devices))
  per = batch // 2 // devices
  for d in range(devices):
    np.testing.assert_array_equal(local[d, :per], whole[d * per:(d + 1) * per])
    np.testing.assert_array_equal(local[d, per:], whole[batch // 2 + d * per:][:per])


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
  log = train.MetricsLog(str(tmp_path))
  for step in (2, 4, 6):
    log.write('generator', step, {'total': float(step)})
  log.write('student', 2, {'kd': 1.0})
  log.resume('generator', 4)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['stage'], r['step']) for r in rows] == [('generator', 2), ('generator', 4),
                                                     ('student', 2)]
