"""How full-depth decoding scales with batch size and cache length, against bare matmuls.

Questions about the decode step itself, with nothing adaptive in the way:
  cache cost     at each batch, the time per new token with a short cache (prompt +
                 short_new positions) and a long one (prompt + long_new): reading more
                 cached K/V costs a little; copying the cache per step would cost a lot.
  batch scaling  tokens/s at batch B over batch 1, next to the same ratio for two bare
                 chains of matrix products run the same number of steps in a
                 lax.fori_loop: what the hardware gives for free at that batch.
                 'matmul chain': per layer x @ W_in [D, F] then @ W_out [F, D], F = mlp_dim;
                 'block chain': every weight product a decode step makes, in the model's
                 shapes (per layer q, k, v, output, gate, up and down projections; then
                 the output head; not attention's products with the cache).

  read steps     the same decode at each step of cache read lengths in read_chunks (a
                 layer is read as far as the step's queries reach, in multiples of that
                 many positions: kv_cache.attend_reachable; 0 reads the whole layer at
                 every step), side by side: what reading only that far saves, and what
                 the extra read lengths cost to compile.

The parameters are random (timing does not depend on their values): no workdir needed.
Every program is compiled and run once, then timed in `repeats` rounds, each round running
every program once in turn; each figure is the median over rounds, and each ratio the
median of the rounds' ratios (both sides of a ratio ran side by side: this machine's speed
drifts by tens of percent between minutes). Each row's 'intervals' give the cache cost,
and above batch 1 the batch ratio and the batch ratio over each chain's (round by round),
with a bootstrap interval of their median (timing.median_with_interval). A decode step's
time excludes the prefill: each setting is also timed with one new token (the prefill's)
and that time is subtracted.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth import timing
from adaptive_depth.decode import generation
from adaptive_depth.decode import kv_cache
from adaptive_depth.decode import sampling as sampling_lib


def decode_program(cfg, params, batch: int, prompt_len: int, max_new: int,
                   read_chunk: int = kv_cache.READ_CHUNK):
  """(compiled, args) of full-depth greedy decoding of max_new tokens after prompt_len-token
  prompts at `batch`, with a cache of prompt_len + max_new + 1 positions, read in steps of
  read_chunk positions (0: whole)."""
  prompt = jnp.ones((batch, prompt_len), jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  run = lambda params: generation.generate_tokens(
      cfg, params, prompt, lengths, max_new_tokens=max_new,
      policy=exits.ExitPolicy(measure='never'), sampling=sampling_lib.Greedy(),
      rng=jax.random.key(0), eos_id=-1, pad_id=0)
  with kv_cache.reading_in_steps(read_chunk):
    return jax.jit(run).lower(params).compile(), (params,)


def matmul_chain_program(cfg, batch: int, steps: int):
  """(compiled, args) of `steps` passes of the bare matmul chain at `batch`."""
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
  return jax.jit(run).lower(weights, x).compile(), (weights, x)


def block_chain_program(cfg, batch: int, steps: int):
  """(compiled, args) of `steps` passes of every matrix product of a full-depth decode step
  (each layer's q, k, v, output, gate, up and down projections, then the output head), in
  the model's shapes, each weight its own buffer, with nothing else between them."""
  rng = np.random.default_rng(0)
  d, f = cfg.width, cfg.mlp_dim
  heads, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = dict(q=(d, heads), k=(d, kv), v=(d, kv), out=(heads, d), gate=(d, f), up=(d, f),
                down=(f, d))
  weight = lambda shape: jnp.asarray(rng.normal(0, 0.02, shape), jnp.float32)
  layers = [{name: weight(shape) for name, shape in shapes.items()}
            for _ in range(cfg.num_layers)]
  head = weight((d, cfg.vocab_size))

  def run(layers, head, x):
    def one_token(_, x):
      for w in layers:
        # k and v feed a mean, so that their products stay in the program.
        kv_mean = jnp.mean(x @ w['k'] + x @ w['v'], axis=-1, keepdims=True)
        x = x + jnp.tanh(x @ w['q']) @ w['out'] + kv_mean
        x = x + (jnp.tanh(x @ w['gate']) * (x @ w['up'])) @ w['down']
      return jnp.tanh(x + jnp.mean(x @ head, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, steps, one_token, x)

  x = jnp.ones((batch, d), jnp.float32)
  return jax.jit(run).lower(layers, head, x).compile(), (layers, head, x)


def run_probe(config, out_path: str, *, batches: Sequence[int] = (1, 8),
              new_tokens: Sequence[int] = (32, 256), prompt_len: int = 32, repeats: int = 5,
              read_chunks: Sequence[int] = (kv_cache.READ_CHUNK,),
              progress: Callable[[str], None] = print) -> dict:
  """Measures these for config.model; writes a JSON report to out_path and returns it."""
  config_lib.validate(config)
  cli.check_output_path('--out', out_path)
  for name, values in (('batches', batches), ('new_tokens', new_tokens),
                       ('prompt_len', [prompt_len]), ('repeats', [repeats])):
    if min(values) < 1:
      raise config_lib.ConfigError(f'--{name}={list(values)}: must be >= 1')
  if (not read_chunks or min(read_chunks) < 0
      or len(set(read_chunks)) != len(read_chunks)):
    raise config_lib.ConfigError(f'--read_chunks={list(read_chunks)}: distinct values >= 0 '
                                 '(0: read the whole cache layer)')
  if 1 not in batches:
    raise config_lib.ConfigError(f'--batches={list(batches)}: include 1 (the ratios are to it)')
  if min(new_tokens) < 2:
    raise config_lib.ConfigError(f'--new_tokens={list(new_tokens)}: must be >= 2 (the '
                                 'first comes from the prefill, whose time is subtracted)')
  if len(set(new_tokens)) != 2:
    raise config_lib.ConfigError(f'--new_tokens={list(new_tokens)}: give a short and a long '
                                 'length, two values (the cache-length cost compares them)')
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = model_lib.per_block_layout(model_lib.init_params(cfg, jax.random.key(0)))
  progress(f'Decode scaling probe: {cfg.num_layers} layers, width {cfg.width}, mlp '
           f'{cfg.mlp_dim}, {prompt_len}-token prompts, median of {repeats} interleaved rounds, on '
           f'{jax.devices()[0].platform}')
  short, long = min(new_tokens), max(new_tokens)
  programs, compile_seconds = {}, {}
  for batch in batches:
    for chunk in read_chunks:
      # A step's time excludes the prefill: max_new=1 is the prefill and its one token.
      for n in sorted({1, short, long}):
        start = time.perf_counter()
        programs[('decode', chunk, batch, n)] = decode_program(cfg, params, batch, prompt_len,
                                                               n, chunk)
        if n == long:  # the long cache's program has the most read lengths
          compile_seconds[(chunk, batch)] = time.perf_counter() - start
    programs[('chain', batch)] = matmul_chain_program(cfg, batch, short)
    programs[('block_chain', batch)] = block_chain_program(cfg, batch, short)
  times = {key: np.asarray(t) for key, t in timing.interleaved_seconds(programs, repeats).items()}
  step = lambda chunk, batch, n: ((times[('decode', chunk, batch, n)]
                                   - times[('decode', chunk, batch, 1)]) / (n - 1))
  chain_tps = {b: b * short / times[('chain', b)] for b in batches}  # per round
  block_chain_tps = {b: b * short / times[('block_chain', b)] for b in batches}
  median = lambda x: float(np.median(x))
  reads = lambda chunk: f'read in steps of {chunk}' if chunk else 'read whole'
  rows = []
  for chunk in read_chunks:
    decode_tps = {b: b / step(chunk, b, short) for b in batches}  # per round
    for batch in batches:
      # Each comparison round by round (both sides of a round ran side by side): its
      # median, with a bootstrap interval (timing.median_with_interval); the batch ratios
      # only above batch 1, where they are not 1 by definition.
      decode_ratio = decode_tps[batch] / decode_tps[1]
      chain_ratio = {'matmul_chain': chain_tps[batch] / chain_tps[1],
                     'block_chain': block_chain_tps[batch] / block_chain_tps[1]}
      per_round = {'cache_length_cost': step(chunk, batch, long) / step(chunk, batch, short)
                                        - 1.0}
      if batch != 1:
        per_round['decode_batch_ratio'] = decode_ratio
        for chain, ratio in chain_ratio.items():
          per_round[f'decode_over_{chain}_batch_ratio'] = decode_ratio / ratio
      intervals = {name: timing.median_with_interval(values)
                   for name, values in per_round.items()}
      row = {'batch': batch, 'read_chunk': chunk,
             **{f'decode_ms_per_step_{n}_new': 1e3 * median(step(chunk, batch, n))
                for n in (short, long)},
             'cache_positions': {n: prompt_len + n + 1 for n in (short, long)},
             # Tracing and compiling the long cache's program.
             'compile_seconds_long': compile_seconds[(chunk, batch)],
             'cache_length_cost': intervals['cache_length_cost']['median'],
             'decode_tokens_per_second': median(decode_tps[batch]),
             'matmul_chain_tokens_per_second': median(chain_tps[batch]),
             'decode_batch_ratio': median(decode_ratio),
             'matmul_chain_batch_ratio': median(chain_ratio['matmul_chain']),
             'block_chain_tokens_per_second': median(block_chain_tps[batch]),
             'block_chain_batch_ratio': median(chain_ratio['block_chain']),
             'intervals': intervals}
      if chunk != read_chunks[0]:  # against the first setting, round by round
        row[f'step_over_read_chunk_{read_chunks[0]}'] = {
            n: median(step(chunk, batch, n) / step(read_chunks[0], batch, n))
            for n in (short, long)}
      rows.append(row)
      progress(f'  batch {batch:>2}, cache {reads(chunk)}: ' + ', '.join(
          f'{row[f"decode_ms_per_step_{n}_new"]:.1f} ms/step with {prompt_len + n + 1} cached '
          'positions' for n in (short, long)) + f' ({100 * row["cache_length_cost"]:+.0f}%), '
          f'compiled in {row["compile_seconds_long"]:.1f} s; matmul chain '
          f'{row["matmul_chain_tokens_per_second"]:.0f} tok/s, block chain '
          f'{row["block_chain_tokens_per_second"]:.0f} tok/s')
      progress(f'    per round: cache-length cost '
               f'{timing.interval_text(intervals["cache_length_cost"], "{:+.1%}")}')
  for row in rows:
    if row['batch'] != 1:
      progress(f'  batch {row["batch"]} over batch 1, tokens/s, cache {reads(row["read_chunk"])}: '
               f'decode {row["decode_batch_ratio"]:.2f}x, bare matmul chain '
               f'{row["matmul_chain_batch_ratio"]:.2f}x, block chain '
               f'{row["block_chain_batch_ratio"]:.2f}x')
      for chain in ('matmul_chain', 'block_chain'):
        progress(f'    per round: decode batch ratio over the {chain.replace("_", " ")}\'s '
                 f'{timing.interval_text(row["intervals"][f"decode_over_{chain}_batch_ratio"])}')
  for row in rows:
    if row['read_chunk'] != read_chunks[0]:
      ratios = row[f'step_over_read_chunk_{read_chunks[0]}']
      progress(f'  batch {row["batch"]}, step with the cache {reads(row["read_chunk"])} over '
               f'{reads(read_chunks[0])}: ' + ', '.join(
                   f'{ratios[n]:.2f}x with {prompt_len + n + 1} cached positions'
                   for n in (short, long)))
  report = {'layers': cfg.num_layers, 'width': cfg.width, 'mlp_dim': cfg.mlp_dim,
            'prompt_len': prompt_len, 'repeats': repeats, 'read_chunks': list(read_chunks),
            'platform': jax.devices()[0].platform,
            'rows': rows}
  with open(out_path, 'w') as f:
    json.dump(report, f, indent=1)
  progress(f'Wrote {out_path}')
  return report
