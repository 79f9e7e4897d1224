"""What a run reports: a progress bar, TensorBoard event files, JSON summaries."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import tqdm


class Progress:
  """A tqdm bar over train steps showing loss, tokens/s and ETA.

  On a terminal it redraws in place; in a log file (CI, nohup) it prints a line at most every
  30 seconds instead of flooding the log.
  """

  def __init__(self, *, total: int, initial: int, tokens_per_step: int, enabled: bool = True):
    interactive = sys.stderr.isatty()
    self._bar = tqdm.tqdm(total=total, initial=initial, unit='step', disable=not enabled,
                          dynamic_ncols=True, mininterval=0.5 if interactive else 30,
                          file=sys.stderr)
    self._tokens_per_step = tokens_per_step
    self._last_time, self._last_step = None, initial

  def update(self, step: int, **scalars):
    """Advances to `step`; scalars (already on the host) go into the postfix."""
    now = time.perf_counter()
    postfix = {k: f'{v:.4f}' for k, v in scalars.items()}
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) * self._tokens_per_step / (now - self._last_time)
      postfix['tok/s'] = f'{rate:,.0f}'
    self._last_time, self._last_step = now, step
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(step - self._bar.n)

  def write(self, message: str):
    self._bar.write(message, file=sys.stderr)

  def close(self):
    self._bar.close()


class EventWriter:
  """Scalars to TensorBoard event files in `logdir` (tensorboardX: no TensorFlow needed)."""

  def __init__(self, logdir: str, purge_step=None):
    """purge_step: on resume, TensorBoard hides events from this step on that the
    interrupted run wrote after its last checkpoint."""
    from tensorboardX import SummaryWriter  # imported late: only runs that log need it
    self._writer = SummaryWriter(logdir=logdir, purge_step=purge_step)

  def scalars(self, step: int, values: dict):
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonLines:
  """Appends one JSON object per line (train and eval history, easy to plot)."""

  def __init__(self, path: str):
    self.path = path

  def append(self, record: dict):
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def truncate_json_lines(path: str, max_step: int):
  """Drops records with 'step' > max_step (after resuming from max_step)."""
  if os.path.exists(path):
    kept = [r for r in read_json_lines(path) if r.get('step', 0) <= max_step]
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, path)


def read_json_lines(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def per_exit_records(exit_depths, losses, accuracies, agreements=None) -> list[dict]:
  """[{'depth', 'loss', 'perplexity', 'accuracy'}] per exit, as plain floats; with
  agreements also 'agreement' (argmax equal to the last exit's)."""
  records = [{'depth': int(d), 'loss': float(l), 'perplexity': float(np.exp(l)),
              'accuracy': float(a)} for d, l, a in zip(exit_depths, losses, accuracies)]
  for record, agreement in zip(records, [] if agreements is None else agreements):
    record['agreement'] = float(agreement)
  return records


def write_json(path: str, payload) -> None:
  """Writes atomically, so a reader never sees half a file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)
