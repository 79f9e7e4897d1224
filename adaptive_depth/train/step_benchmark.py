"""The jitted train step alone, per attention implementation (launch/train_benchmark.py).

For each implementation of config.model.attention asked for, the train step of
config.model at config.train.batch_size x config.data.seq_len (the same function
train/loop.py jits: multi-exit loss, gradient, AdamW) is compiled, run once, then timed in
`rounds` rounds, each round running every implementation once in turn, so the figures
compared were measured side by side while the machine's speed drifts. Reported per
implementation: the median step time, tokens/s, and FLOP/s from XLA's own count of the
compiled step (cost_analysis). The data pipeline is left out: one random batch.
"""
from __future__ import annotations

import json
import resource
import tempfile
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import attention as attention_lib
from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import costs
from adaptive_depth import model as model_lib
from adaptive_depth import timing
from adaptive_depth.train import loop
from adaptive_depth.train import losses
from adaptive_depth.train import state as state_lib


def compiled_step(config, rng_batch):
  """(compiled step, its arguments, XLA's FLOP count) for config.model as it stands."""
  cfg = model_lib.ModelConfig.from_config(config.model)
  # Initialised in one program each: op by op, every leaf shape compiles its own programs.
  # (Values may differ from launch/train.py's initialisation in the last bit; a timing
  # benchmark does not depend on them.)
  params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(config.seed))
  tx = state_lib.make_optimizer(config.train)
  state = state_lib.TrainState(step=jnp.int32(0), params=params,
                               opt_state=jax.jit(tx.init)(params))
  weights = losses.exit_loss_weights(config.train.exit_loss_weights, cfg.exit_depths)
  step = loop.make_train_step(cfg, tx, weights, lambda x: x, exit_loss=config.train.exit_loss,
                              trainable=config.train.trainable,
                              loss_chunk_tokens=config.train.loss_chunk_tokens,
                              splits=loop.batch_splits(config, cfg))
  compiled = jax.jit(step).lower(state, rng_batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax
  return compiled, (state, rng_batch), float((cost or {}).get('flops', 0.0))


def random_batch(config):
  """One fixed random batch [B, T + 1] of config.train.batch_size x config.data.seq_len."""
  return jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size, (config.train.batch_size, config.data.seq_len + 1)),
      jnp.int32)


class _FaultCountingStep:
  """A compiled step that counts this process's minor page faults over each call (each one a
  fresh page the step's buffers touched; see host_memory.py), so the faults reported are
  those of the very calls that were timed, warm-up calls left out."""

  def __init__(self, compiled):
    self._compiled = compiled
    self._skip_next = False
    self.faults = []  # per timed call

  def skip_next_call(self):
    """Leaves the next call (timing.interleaved_seconds' warm-up) out of the count."""
    self._skip_next = True

  def __call__(self, *args):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = jax.block_until_ready(self._compiled(*args))
    if not self._skip_next:
      self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    self._skip_next = False
    return out


def _timed_rounds(timed: dict, counting: dict, rounds: int) -> dict:
  """timing.interleaved_seconds(timed, rounds), its warm-up calls left out of the faults."""
  for step in counting.values():
    step.skip_next_call()
  return timing.interleaved_seconds(timed, rounds)


def memory_report(compiled, config) -> dict:
  """XLA's memory analysis of a compiled step, beside the bytes of every exit's float32
  logits at once (exits x tokens x vocab x 4), which the chunked loss avoids holding."""
  analysis = compiled.memory_analysis()
  cfg = model_lib.ModelConfig.from_config(config.model)
  logits = (len(cfg.exit_depths) * config.train.batch_size * config.data.seq_len *
            cfg.vocab_size * 4)
  return {'temp_bytes': int(getattr(analysis, 'temp_size_in_bytes', -1)),
          'argument_bytes': int(getattr(analysis, 'argument_size_in_bytes', -1)),
          'all_exit_logits_bytes': logits,
          'loss_chunk_tokens': config.train.loss_chunk_tokens}


def _whole_run_tokens_per_second(config, steps: int, progress) -> float:
  """launch/train.py's own tokens/s (data pipeline, logging and checkpoints included,
  compilation excluded) over `steps` steps of `config` in a scratch workdir."""
  run = config.copy_and_resolve_references()
  with run.unlocked():
    run.train.num_steps = steps
    run.train.progress_bar = False
    run.eval.every_steps = 0
  with tempfile.TemporaryDirectory() as workdir:
    summary = loop.train_model(run, workdir)
  progress(f'  launch/train.py ({steps} steps: data, logging, checkpoints every '
           f'{run.checkpoint.every_steps}) {summary["tokens_per_second"]:7.0f} tokens/s')
  return float(summary['tokens_per_second'])


def run_step_benchmark(config, out_path: str, *, implementations: Sequence[str],
                       rounds: int = 5, progress: Callable[[str], None] = print,
                       reference_steps: Optional[dict] = None,
                       whole_run_steps: int = 0, batch_splits: Sequence[int] = ()) -> list:
  """Times the train step under each implementation; writes the rows to out_path (JSON).

  batch_splits: values of config.train.batch_splits to time each implementation under (one
  row each, 'NAME, K parts'; default: the config's own), in the same interleaved rounds.

  reference_steps: {name: make_step(batch [B, T + 1] numpy) -> no-argument callable running
  one step}, other implementations of the same step (launch/train_benchmark.py --torch: the
  PyTorch one), timed in the same rounds; every row then says how its step time compares
  with theirs ('speed_vs_<name>': their step time over this row's).
  whole_run_steps > 0: also the whole training loop (train/loop.py, what launch/train.py
  runs) for that many steps, between two halves of the timed rounds; its tokens/s is
  reported as a fraction of the step alone under config.model.attention."""
  config_lib.validate(config)
  cli.check_output_path('--out', out_path)
  if rounds < 0:
    raise config_lib.ConfigError(f'--rounds={rounds}: must be >= 0 (0 = compile and report '
                                 'memory only)')
  if not implementations:
    raise config_lib.ConfigError('--attention: name at least one implementation')
  for splits in batch_splits:  # each value checked as the config key it sets
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.train.batch_splits = splits
    try:
      config_lib.validate(trial)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'--batch_splits={splits}: {e}') from None
  if not rounds and (reference_steps or whole_run_steps):
    raise config_lib.ConfigError('--rounds=0 compiles only: it times nothing, so --torch and '
                                 '--whole_run_steps need --rounds >= 1')
  if whole_run_steps < 0:
    raise config_lib.ConfigError(f'--whole_run_steps={whole_run_steps}: must be >= 0 '
                                 '(0 = no whole run)')
  for name in implementations:
    if name not in attention_lib.IMPLEMENTATIONS:
      raise config_lib.ConfigError(f'--attention={name!r}; allowed: '
                                   f'{", ".join(attention_lib.IMPLEMENTATIONS)}')
    problem = attention_lib.platform_error(name)
    if problem:
      raise config_lib.ConfigError(problem)
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  batch = random_batch(config)
  progress(f'Train step benchmark: batch {batch_size} x {seq_len}, {rounds} interleaved '
           f'rounds, on {jax.devices()[0].platform}')
  cfg = model_lib.ModelConfig.from_config(config.model)
  programs, memory, attention_of, splits_of = {}, {}, {}, {}
  chosen, chosen_splits = config.model.attention, config.train.batch_splits
  try:
    for name in implementations:
      for splits in batch_splits or [chosen_splits]:
        label = f'{name}, {splits} part{"s" * (splits != 1)}' if batch_splits else name
        config.model.attention, config.train.batch_splits = name, splits
        programs[label] = compiled_step(config, batch)
        memory[label] = memory_report(programs[label][0], config)
        attention_of[label], splits_of[label] = name, loop.batch_splits(config, cfg)
        progress(f'  {label:<22} compiled: {memory[label]["temp_bytes"] / 1e9:.2f} GB '
                 f'temporary (every exit\'s logits at once: '
                 f'{memory[label]["all_exit_logits_bytes"] / 1e9:.2f} GB)')
  finally:  # the caller's config as it was
    config.model.attention, config.train.batch_splits = chosen, chosen_splits
  if not rounds:  # compile only: the memory each step needs
    rows = [{'implementation': label, 'attention': attention_of[label],
             'batch_splits': splits_of[label], 'batch': batch_size, 'seq_len': seq_len,
             **memory[label]} for label in programs]
    with open(out_path, 'w') as f:
      json.dump(rows, f, indent=1)
    progress(f'Wrote {out_path}')
    return rows
  counting = {name: _FaultCountingStep(compiled) for name, (compiled, _, _) in programs.items()}
  timed = {name: (counting[name], args) for name, (_, args, _) in programs.items()}
  for name, make_step in (reference_steps or {}).items():
    timed[name] = (make_step(np.asarray(batch)), ())
  try:
    if whole_run_steps:
      first_half = _timed_rounds(timed, counting, (rounds + 1) // 2)
      whole = _whole_run_tokens_per_second(config, whole_run_steps, progress)
      second_half = _timed_rounds(timed, counting, rounds // 2) if rounds > 1 else {}
      times = {k: first_half[k] + second_half.get(k, []) for k in timed}
    else:
      times = _timed_rounds(timed, counting, rounds)
  finally:
    for step, _ in timed.values():  # e.g. a reference step's child process
      if hasattr(step, 'close'):
        step.close()
  faults = {name: step.faults for name, step in counting.items()}
  # The same step's arithmetic, whoever runs it: XLA's count of the first implementation.
  flops_of = {name: flops for name, (_, _, flops) in programs.items()}
  same_step_flops = next(iter(flops_of.values()))
  rows = []
  for name in timed:
    flops = flops_of.get(name, same_step_flops)
    seconds = float(np.median(times[name]))
    rows.append({'attention': attention_of.get(name), 'implementation': name,
                 'batch_splits': splits_of.get(name),
                 'resolved': (attention_lib.resolve(attention_of[name]) if name in programs
                              else name),
                 'step_ms': 1e3 * seconds, 'tokens_per_second': batch_size * seq_len / seconds,
                 'flops_per_step': flops, 'flops_per_second': flops / seconds,
                 'rounds': rounds, 'batch': batch_size, 'seq_len': seq_len,
                 **({'page_faults_per_step': float(np.median(faults[name])),
                     'page_faults_per_timed_call': faults[name]} if name in faults else {}),
                 **memory.get(name, {})})
  for row in rows:
    name = row['implementation']
    compared = []
    for reference in reference_steps or {}:
      row[f'speed_vs_{reference}'] = (float(np.median(times[reference])) * 1e3 /
                                      row['step_ms'])
      if reference != name:
        # Round by round (both steps of a round ran side by side), with the interval that
        # says whether "at least as fast" holds beyond the spread between rounds.
        per_round = row[f'speed_vs_{reference}_per_round'] = timing.median_with_interval(
            np.asarray(times[reference]) / np.asarray(times[name]))
        compared.append(f'    {row[f"speed_vs_{reference}"]:.2f}x {reference}\'s speed; '
                        f'per round: {timing.interval_text(per_round)}')
    faulted = (f'  {row["page_faults_per_step"]:,.0f} page faults/step (median)'
               if 'page_faults_per_step' in row else '')
    progress(f'  {name:<22} {row["step_ms"]:7.1f} ms/step  '
             f'{row["tokens_per_second"]:7.0f} tokens/s  '
             f'{row["flops_per_second"] / 1e9:6.1f} GFLOP/s (XLA count){faulted}')
    for line in compared:
      progress(line)
  if whole_run_steps:
    # The row of the step launch/train.py runs: the config's attention and batch split.
    chosen = (attention_lib.resolve(config.model.attention), loop.batch_splits(config, cfg))
    step_alone = next((r for r in rows if (r['resolved'], r['batch_splits']) == chosen),
                      rows[0])
    rows.append({'implementation': 'launch/train.py', 'attention': config.model.attention,
                 'steps': whole_run_steps, 'tokens_per_second': whole,
                 'fraction_of_step_alone': whole / step_alone['tokens_per_second'],
                 'step_alone': step_alone['implementation']})
    progress(f'  launch/train.py reaches {rows[-1]["fraction_of_step_alone"]:.2f} of the '
             f'step alone ({step_alone["implementation"]})')
  with open(out_path, 'w') as f:
    json.dump(rows, f, indent=1)
  progress(f'Wrote {out_path}')
  return rows


def full_recursion_benchmark(config, out_path: str, *, rounds: int = 5,
                             progress: Callable[[str], None] = print) -> dict:
  """Do routed recursions save what they should? The expert-choice MoR train step of
  `config` against the same model, same parameters and batch, with every token running every
  recursion (config.model.mor.capacities all 1), timed in `rounds` interleaved rounds, beside
  the FLOP ratio costs.mor_flops_per_token predicts (and XLA's count of each compiled step).
  Writes and returns {'time_ratio', 'flop_ratio', 'time_over_flop_ratio', ...}."""
  config_lib.validate(config)
  cli.check_output_path('--out', out_path)
  mor = config.model.mor
  if mor.routing != 'expert_choice':
    raise config_lib.ConfigError(
        f'--full_recursion compares expert-choice capacities with full ones; '
        f'config.model.mor.routing={mor.routing!r} (allowed: \'expert_choice\')')
  if rounds < 1:
    raise config_lib.ConfigError(f'--rounds={rounds}: must be >= 1')
  full = config.copy_and_resolve_references()
  full.model.mor.capacities = ','.join(['1'] * mor.recursions)
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  batch = random_batch(config)
  progress(f'MoR train step, routed vs every token through every recursion: batch '
           f'{batch_size} x {seq_len}, {rounds} interleaved rounds, on '
           f'{jax.devices()[0].platform}')
  programs = {'routed': compiled_step(config, batch), 'full': compiled_step(full, batch)}
  times = timing.interleaved_seconds({k: (c, a) for k, (c, a, _) in programs.items()}, rounds)
  ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  cfg = model_lib.ModelConfig.from_config(config.model)
  full_cfg = model_lib.ModelConfig.from_config(full.model)
  flop_ratio = (costs.mor_flops_per_token(cfg, seq_len) /
                costs.mor_flops_per_token(full_cfg, seq_len))
  report = {
      'capacities': list(cfg.routing.capacities),
      'capacity_tokens': list(cfg.routing.capacity_tokens(seq_len)),
      'kv': cfg.routing.kv, 'batch': batch_size, 'seq_len': seq_len, 'rounds': rounds,
      'routed_step_ms': ms['routed'], 'full_step_ms': ms['full'],
      'time_ratio': ms['routed'] / ms['full'], 'flop_ratio': flop_ratio,
      'xla_flop_ratio': programs['routed'][2] / max(programs['full'][2], 1.0),
  }
  report['time_over_flop_ratio'] = report['time_ratio'] / flop_ratio
  progress(f'  routed {ms["routed"]:.1f} ms/step, every recursion {ms["full"]:.1f} ms/step: '
           f'time ratio {report["time_ratio"]:.3f}; FLOP ratio {flop_ratio:.3f} (costs), '
           f'{report["xla_flop_ratio"]:.3f} (XLA); time / FLOP ratio '
           f'{report["time_over_flop_ratio"]:.3f}')
  with open(out_path, 'w') as f:
    json.dump(report, f, indent=1)
  progress(f'Wrote {out_path}')
  return report
