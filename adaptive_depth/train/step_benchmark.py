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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import attention as attention_lib
from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import model as model_lib
from adaptive_depth import timing
from adaptive_depth.train import loop
from adaptive_depth.train import losses
from adaptive_depth.train import state as state_lib


def _compiled_step(config, rng_batch):
  """(compiled step, its arguments, XLA's FLOP count) for config.model as it stands."""
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = model_lib.init_params(cfg, jax.random.key(config.seed))
  tx = state_lib.make_optimizer(config.train)
  state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  weights = losses.exit_loss_weights(config.train.exit_loss_weights, cfg.exit_depths)
  step = loop.make_train_step(cfg, tx, weights, lambda x: x, exit_loss=config.train.exit_loss,
                              trainable=config.train.trainable)
  compiled = jax.jit(step).lower(state, rng_batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax
  return compiled, (state, rng_batch), float((cost or {}).get('flops', 0.0))


def run_step_benchmark(config, out_path: str, *, implementations: Sequence[str],
                       rounds: int = 5, progress: Callable[[str], None] = print) -> list:
  """Times the train step under each implementation; writes the rows to out_path (JSON)."""
  config_lib.validate(config)
  cli.check_output_path('--out', out_path)
  if rounds < 1:
    raise config_lib.ConfigError(f'--rounds={rounds}: must be >= 1')
  for name in implementations:
    if name not in attention_lib.IMPLEMENTATIONS:
      raise config_lib.ConfigError(f'--attention={name!r}; allowed: '
                                   f'{", ".join(attention_lib.IMPLEMENTATIONS)}')
    problem = attention_lib.platform_error(name)
    if problem:
      raise config_lib.ConfigError(problem)
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  batch = jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size, (batch_size, seq_len + 1)), jnp.int32)
  progress(f'Train step benchmark: batch {batch_size} x {seq_len}, {rounds} interleaved '
           f'rounds, on {jax.devices()[0].platform}')
  programs = {}
  chosen = config.model.attention
  try:
    for name in implementations:
      config.model.attention = name
      programs[name] = _compiled_step(config, batch)
  finally:
    config.model.attention = chosen  # the caller's config as it was
  times = timing.interleaved_seconds(
      {name: (compiled, args) for name, (compiled, args, _) in programs.items()}, rounds)
  rows = []
  for name, (_, _, flops) in programs.items():
    seconds = float(np.median(times[name]))
    rows.append({'attention': name, 'resolved': attention_lib.resolve(name),
                 'step_ms': 1e3 * seconds, 'tokens_per_second': batch_size * seq_len / seconds,
                 'flops_per_step': flops, 'flops_per_second': flops / seconds,
                 'rounds': rounds, 'batch': batch_size, 'seq_len': seq_len})
    progress(f'  {name:<22} {rows[-1]["step_ms"]:7.1f} ms/step  '
             f'{rows[-1]["tokens_per_second"]:7.0f} tokens/s  '
             f'{rows[-1]["flops_per_second"] / 1e9:6.1f} GFLOP/s (XLA count)')
  with open(out_path, 'w') as f:
    json.dump(rows, f, indent=1)
  progress(f'Wrote {out_path}')
  return rows
