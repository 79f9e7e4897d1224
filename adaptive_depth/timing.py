"""Timing compiled programs side by side (the decode probe, the train step benchmark).

This shared machine's speed drifts by tens of percent between minutes, so programs whose
times are compared run in rounds, each round running every one of them once in turn.
"""
from __future__ import annotations

import time

import jax


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
