"""Where the train step's time goes (launch/train_profile.py).

The compiled train step (the function train/loop.py jits; random parameters and batch, as
in step_benchmark.py) runs under `jax.profiler` for a few steps. Every operation event of the
trace is joined, by its HLO instruction name, to the `op_name` metadata of the compiled HLO,
which says where in the model it comes from and whether it belongs to the forward pass
(`jvp(...)`), the backward pass (`transpose(jvp(...))`) or the optimizer update (neither).
Reported, per step: the traced step time, the operations' time summed over every thread
(more than the step time where operations ran at once), split by pass, by part of the model
and by kind of operation, and the slowest operations. The figures are the operations' own
times under the profiler, which slows the step a little.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Callable

import jax

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth.train import step_benchmark

# Trace events that are the runtime's own bookkeeping, not an operation of the program.
_RUNTIME_EVENTS = ('$', 'ThunkExecutor', 'Thunk', 'end: ', 'PjitFunction', 'CommonPjRt',
                   'Handle ', 'SlinkyThreadPool', 'ThreadpoolListener', 'PythonRefManager')
# Parts of the model by op_name, first match wins.
_PARTS = (('attention', r'/attn[/.]'), ('mlp', r'/mlp/'), ('norms', r'[Nn]orm'),
          ('exit heads and loss',
           r'd,vd->|d,dv->|log_softmax|cross_entropy|take_along_axis|/reduce$'),
          ('embedding', r'embed|_take'))


def _pass_of(op_name: str) -> str:
  if 'transpose(jvp' in op_name:
    return 'backward'
  return 'forward' if 'jvp(' in op_name else 'update and the rest'


def _part_of(op_name: str) -> str:
  return next((part for part, pattern in _PARTS if re.search(pattern, op_name)), 'other')


def _kind_of(instruction: str) -> str:
  """ynn_fusion.12 -> 'ynn_fusion' (matrix products in YNNPACK on CPU), dot.3 -> 'dot'."""
  return re.sub(r'\.\d+$', '', instruction)


def _op_names(hlo_text: str) -> dict:
  """{HLO instruction name: op_name} of the compiled program."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]+)"', line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def _trace_events(trace_dir: str) -> list:
  """The complete ('X') events of the one trace written under trace_dir."""
  files = (glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True) or
           glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True))
  if not files:
    raise RuntimeError(f'jax.profiler wrote no trace under {trace_dir}')
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    return [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X' and 'dur' in e]


def _grouped(rows, key) -> dict:
  totals = collections.Counter()
  for row in rows:
    totals[row[key]] += row['ms']
  return dict(totals.most_common())


def profile_step(config, out_dir: str, *, steps: int = 3, top: int = 20,
                 progress: Callable[[str], None] = print) -> dict:
  """Traces `steps` train steps of config (after one untraced call) into out_dir/trace and
  writes out_dir/profile.json; returns that report (times in ms per step)."""
  config_lib.validate(config)
  if steps < 1 or top < 1:
    raise config_lib.ConfigError(f'--steps={steps}, --top={top}: both must be >= 1')
  cli.check_output_path('--out', out_dir)  # its parent must exist; out_dir is made here
  os.makedirs(out_dir, exist_ok=True)
  trace_dir = os.path.join(out_dir, 'trace')
  batch = step_benchmark.random_batch(config)
  compiled, args, _ = step_benchmark.compiled_step(config, batch)
  op_names = _op_names(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  progress(f'Tracing {steps} train steps of batch {config.train.batch_size} x '
           f'{config.data.seq_len} into {trace_dir}')
  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
  finally:
    jax.profiler.stop_trace()
  events = _trace_events(trace_dir)
  ops = [e for e in events if e['name'] in op_names and
         not e['name'].startswith(_RUNTIME_EVENTS)]
  if not ops:
    raise RuntimeError(f'no event of the trace under {trace_dir} names an operation of the '
                       'compiled step')
  per_op = collections.Counter()
  for event in ops:
    per_op[event['name']] += event['dur'] / 1e3 / steps
  rows = [{'instruction': name, 'ms': ms, 'op_name': op_names[name],
           'pass': _pass_of(op_names[name]), 'part': _part_of(op_names[name]),
           'kind': _kind_of(name)} for name, ms in per_op.items()]
  rows.sort(key=lambda row: -row['ms'])
  step_ms = (max(e['ts'] + e['dur'] for e in ops) - min(e['ts'] for e in ops)) / 1e3 / steps
  report = {'batch': config.train.batch_size, 'seq_len': config.data.seq_len,
            'attention': config.model.attention, 'steps': steps,
            'traced_step_ms': step_ms, 'operations_ms': sum(row['ms'] for row in rows),
            'by_pass': _grouped(rows, 'pass'), 'by_part': _grouped(rows, 'part'),
            'by_kind': _grouped(rows, 'kind'),
            'slowest': rows[:top]}
  with open(os.path.join(out_dir, 'profile.json'), 'w') as f:
    json.dump(report, f, indent=1)
  progress(f'  step {report["traced_step_ms"]:.1f} ms traced; operations '
           f'{report["operations_ms"]:.1f} ms summed over threads')
  for heading in ('by_pass', 'by_part', 'by_kind'):
    shown = list(report[heading].items())[:8]
    progress(f'  {heading.replace("_", " ")}: ' +
             ', '.join(f'{name} {ms:.1f}' for name, ms in shown))
  progress('  slowest operations (ms per step, pass, op_name):')
  for row in report['slowest']:
    progress(f'    {row["ms"]:7.2f}  {row["pass"]:<8.8} {row["instruction"]:<28.28} '
             f'{row["op_name"][-80:]}')
  progress(f'Wrote {os.path.join(out_dir, "profile.json")}')
  return report
