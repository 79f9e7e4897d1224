"""How full-depth decoding scales with batch size and cache length, against bare matmuls.

Two questions about the decode step itself, with nothing adaptive in the way:
  cache cost     at each batch, the time per new token with a short cache (prompt +
                 short_new positions) and a long one (prompt + long_new): reading more
                 cached K/V costs a little; copying the cache per step would cost a lot.
  batch scaling  tokens/s at batch B over batch 1, next to the same ratio for a bare chain
                 of the model's matrix products (per layer x @ W_in [D, F] then @ W_out
                 [F, D], F = mlp_dim, num_layers of them) run the same number of steps in a
                 lax.fori_loop: what the hardware gives for free at that batch.

The parameters are random (timing does not depend on their values): no workdir needed.
Every program is compiled and run once before `repeats` timed runs; figures are medians.
A decode step's time excludes the prefill: each setting is also timed with one new token
(the prefill's) and that time is subtracted.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib


def _median_seconds(compiled, args, repeats: int) -> float:
  """The median wall time of `repeats` runs after one warm-up."""
  jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  return statistics.median(runs)


def decode_seconds_per_token(cfg, params, batch: int, prompt_len: int, new_tokens: int,
                             repeats: int) -> float:
  """Median wall seconds per decode step of full-depth greedy decoding with a cache of
  prompt_len + new_tokens + 1 positions: (time for new_tokens - time for the prefill and
  its one token) / (new_tokens - 1), so the prefill is not amortised into the step."""
  prompt = jnp.ones((batch, prompt_len), jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)

  def seconds(max_new):
    run = lambda params: generation.generate_tokens(
        cfg, params, prompt, lengths, max_new_tokens=max_new,
        policy=exits.ExitPolicy(measure='never'), sampling=sampling_lib.Greedy(),
        rng=jax.random.key(0), eos_id=-1, pad_id=0)
    return _median_seconds(jax.jit(run).lower(params).compile(), (params,), repeats)

  return (seconds(new_tokens) - seconds(1)) / (new_tokens - 1)


def matmul_chain_seconds_per_token(cfg, batch: int, steps: int, repeats: int) -> float:
  """Median wall seconds per token of `steps` passes of the bare matmul chain at `batch`."""
  rng = np.random.default_rng(0)
  w_in = jnp.asarray(rng.normal(0, 0.02, (cfg.num_layers, cfg.width, cfg.mlp_dim)), jnp.float32)
  w_out = jnp.asarray(rng.normal(0, 0.02, (cfg.num_layers, cfg.mlp_dim, cfg.width)),
                      jnp.float32)
  weights = [(w_in[i], w_out[i]) for i in range(cfg.num_layers)]  # each its own buffer

  def run(weights, x):
    def one_token(_, x):
      for w1, w2 in weights:
        x = jnp.tanh(x @ w1) @ w2  # tanh: keeps values bounded, costs nothing next to a dot
      return x
    return jax.lax.fori_loop(0, steps, one_token, x)

  x = jnp.ones((batch, cfg.width), jnp.float32)
  compiled = jax.jit(run).lower(weights, x).compile()
  return _median_seconds(compiled, (weights, x), repeats) / steps


def run_probe(config, out_path: str, *, batches: Sequence[int] = (1, 8),
              new_tokens: Sequence[int] = (32, 256), prompt_len: int = 32, repeats: int = 3,
              progress: Callable[[str], None] = print) -> dict:
  """Measures both questions for config.model; writes a JSON report to out_path and
  returns it."""
  config_lib.validate(config)
  cli.check_output_path('--out', out_path)
  for name, values in (('batches', batches), ('new_tokens', new_tokens),
                       ('prompt_len', [prompt_len]), ('repeats', [repeats])):
    if min(values) < 1:
      raise config_lib.ConfigError(f'--{name}={list(values)}: must be >= 1')
  if 1 not in batches:
    raise config_lib.ConfigError(f'--batches={list(batches)}: include 1 (the ratios are to it)')
  if min(new_tokens) < 2:
    raise config_lib.ConfigError(f'--new_tokens={list(new_tokens)}: must be >= 2 (the '
                                 'first comes from the prefill, whose time is subtracted)')
  if len(set(new_tokens)) < 2:
    raise config_lib.ConfigError(f'--new_tokens={list(new_tokens)}: give a short and a long '
                                 'length (the cache-length cost compares them)')
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = model_lib.per_block_layout(model_lib.init_params(cfg, jax.random.key(0)))
  progress(f'Decode scaling probe: {cfg.num_layers} layers, width {cfg.width}, mlp '
           f'{cfg.mlp_dim}, {prompt_len}-token prompts, median of {repeats} runs, on '
           f'{jax.devices()[0].platform}')
  short, long = min(new_tokens), max(new_tokens)
  rows = []
  for batch in batches:
    decode = {n: decode_seconds_per_token(cfg, params, batch, prompt_len, n, repeats)
              for n in sorted(set(new_tokens))}
    chain = matmul_chain_seconds_per_token(cfg, batch, short, repeats)
    row = {'batch': batch,
           **{f'decode_ms_per_step_{n}_new': 1e3 * s for n, s in decode.items()},
           'cache_positions': {n: prompt_len + n + 1 for n in decode},
           'cache_length_cost': decode[long] / decode[short] - 1.0,
           'decode_tokens_per_second': batch / decode[short],
           'matmul_chain_tokens_per_second': batch / chain}
    rows.append(row)
    progress(f'  batch {batch:>2}: ' + ', '.join(
        f'{1e3 * s:.1f} ms/step with {prompt_len + n + 1} cached positions'
        for n, s in decode.items()) + f' (+{100 * row["cache_length_cost"]:.0f}%); matmul '
        f'chain {row["matmul_chain_tokens_per_second"]:.0f} tok/s')
  one = next(r for r in rows if r['batch'] == 1)
  for row in rows:
    row['decode_batch_ratio'] = row['decode_tokens_per_second'] / one['decode_tokens_per_second']
    row['matmul_chain_batch_ratio'] = (row['matmul_chain_tokens_per_second']
                                       / one['matmul_chain_tokens_per_second'])
    if row['batch'] != 1:
      progress(f'  batch {row["batch"]} over batch 1, tokens/s: decode '
               f'{row["decode_batch_ratio"]:.2f}x, bare matmul chain '
               f'{row["matmul_chain_batch_ratio"]:.2f}x')
  report = {'layers': cfg.num_layers, 'width': cfg.width, 'mlp_dim': cfg.mlp_dim,
            'prompt_len': prompt_len, 'repeats': repeats, 'platform': jax.devices()[0].platform,
            'rows': rows}
  with open(out_path, 'w') as f:
    json.dump(report, f, indent=1)
  progress(f'Wrote {out_path}')
  return report
