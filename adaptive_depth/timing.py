"""Timing compiled programs side by side (the decode probe, the train step benchmark).

This shared machine's speed drifts by tens of percent between minutes, so programs whose
times are compared run in rounds, each round running every one of them once in turn; a
comparison is then the median of the rounds' ratios, with a bootstrap interval that says how
far the spread between rounds leaves it uncertain.
"""
from __future__ import annotations

import time

import jax
import numpy as np


def interleaved_seconds(programs: dict, repeats: int) -> dict:
  """Wall seconds of every program in `programs` ({key: (compiled, args)}), `repeats`
  rounds after one warm-up each; a round runs every program once, in turn, so that the
  figures compared with each other are measured side by side while the machine's speed
  drifts. Returns {key: [seconds per round]}."""
  for compiled, args in programs.values():
    jax.block_until_ready(compiled(*args))
  times = {key: [] for key in programs}
  for _ in range(repeats):
    for key, (compiled, args) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[key].append(time.perf_counter() - start)
  return times


def median_with_interval(per_round, level: float = 0.95, resamples: int = 2000,
                         seed: int = 0) -> dict:
  """The median of per-round values (e.g. each round's ratio of two programs' times, both
  measured side by side) with a bootstrap percentile interval for it: the rounds resampled
  with replacement `resamples` times (numpy default_rng(seed)), the median of each
  resample, and the central `level` of those medians.

  per_round: [R] values. Returns {'median', 'low', 'high', 'level', 'rounds'}. With few
  rounds the interval is coarse (it can only fall on values the rounds took), but it says
  whether a bound such as "at least 1.0x" holds beyond the run-to-run spread.
  """
  values = np.asarray(per_round, dtype=np.float64).reshape(-1)
  if not values.size:
    raise ValueError('per_round is empty: median_with_interval needs at least one round')
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ValueError(f'per_round has {bad.size} non-finite value(s) (first at index '
                     f'{bad[0]}: {values[bad[0]]}): every value must be finite')
  if not 0.0 < level < 1.0:
    raise ValueError(f'level={level}: must be in (0, 1)')
  if resamples < 1:
    raise ValueError(f'resamples={resamples}: must be >= 1')
  picks = np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))
  medians = np.median(values[picks], axis=1)
  low, high = np.quantile(medians, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return {'median': float(np.median(values)), 'low': float(low), 'high': float(high),
          'level': level, 'rounds': int(values.size)}


def interval_text(stats: dict, fmt: str = '{:.2f}') -> str:
  """'1.02 (95% interval 0.99 to 1.05, 12 rounds)' from median_with_interval's dict."""
  return (f'{fmt.format(stats["median"])} ({100 * stats["level"]:.0f}% interval '
          f'{fmt.format(stats["low"])} to {fmt.format(stats["high"])}, {stats["rounds"]} rounds)')
