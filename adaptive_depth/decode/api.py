"""`generate(model, prompts, ...)`: text in, text out, with each token's exit depth and stats."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import costs
from adaptive_depth import exits
from adaptive_depth import saved_model
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.decode import speculative as speculative_lib


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """texts: decoded continuations; tokens / exit_depths: per row, the generated ids and the
  depth each left the loop at (the first comes from the full-depth prefill); stats: mean
  depth, tokens/s (compile excluded), compile seconds, FLOPs relative to full depth."""
  texts: list
  tokens: list
  exit_depths: list
  stats: dict


_PROGRAMS: dict = {}  # (static settings, argument structure and shapes) -> compiled program


def _program(static, run, args):
  """The compiled program for these static settings and argument shapes, compiling it on
  first use: thresholds, sampling knobs, seeds and prompts of the same padded length reuse
  it. Returns (program, compile seconds: 0.0 when reused)."""
  spec = lambda x: (tuple(getattr(x, 'shape', ())), str(getattr(x, 'dtype', type(x))))
  key = (static, jax.tree.structure(args), tuple(spec(x) for x in jax.tree.leaves(args)))
  if key in _PROGRAMS:
    return _PROGRAMS[key], 0.0
  start = time.perf_counter()
  _PROGRAMS[key] = jax.jit(run).lower(*args).compile()
  return _PROGRAMS[key], time.perf_counter() - start


def generate_from_config(model, prompts: Sequence[str], config) -> GenerateOutput:
  """`generate` with the settings of `config.generate` (what launch/generate.py runs)."""
  g = config.generate
  policy = exits.ExitPolicy(measure=g.measure, schedule=g.schedule, threshold=g.threshold,
                            tau=g.tau, min_depth=g.min_depth)
  sampling = (sampling_lib.Greedy() if g.temperature == 0 else
              sampling_lib.Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p))
  if g.speculative:
    from adaptive_depth import benchmark  # the shared 'ExK' parser
    return generate(model, prompts, max_new_tokens=g.max_new_tokens,
                    speculative=benchmark.parse_speculative(g.speculative)[0])
  return generate(model, prompts, max_new_tokens=g.max_new_tokens, exit=policy, kv=g.kv,
                  queue_capacity=g.queue_capacity, sampling=sampling, seed=g.seed)


def generate(model, prompts, *args, max_new_tokens: int = 64,
             exit: Optional[exits.ExitPolicy] = None, kv: str = 'propagate',
             queue_capacity: int = 8, sampling: Any = None, seed: int = 0,
             classifier=None, speculative: Optional[tuple[int, int]] = None) -> GenerateOutput:
  """Generates a continuation of each prompt (a batch, ragged lengths allowed).

  Called as generate(model, prompts, ...) with model = ad.load(workdir), or as
  generate(params, config, prompts, ...) with a parameter pytree and its run config (which
  copies the blocks into the decode layout on every call; for repeated calls keep
  model = saved_model.from_params(params, config), which makes it once).
  exit: the early-exit policy (default: never exit).
  kv: KV policy for the layers a token skipped, one of generation.KV_POLICIES: 'propagate'
  (CALM state propagation) or 'parallel' (queued tokens catch up in the next deep pass; at
  most queue_capacity per row). sampling: Greedy() (default) or
  Sampling(temperature, top_k, top_p). speculative=(E, k): greedy self-speculative decoding
  instead (draft k tokens with the first E layers, verify at full depth; exact).
  """
  if not isinstance(model, saved_model.LoadedModel):
    if len(args) != 1:
      raise TypeError('generate(params, config, prompts, ...) or generate(model, prompts, ...)'
                      ' with model = adaptive_depth.load(workdir)')
    model, prompts = saved_model.from_params(model, prompts), args[0]
  elif args:
    raise TypeError(f'generate(model, prompts, ...): unexpected positional arguments {args}')
  if isinstance(prompts, str):
    raise TypeError('prompts must be a list of strings (a batch), e.g. ["To be"]')
  generation.check_kv_policy(kv, queue_capacity)
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}: must be >= 1')
  cfg, tokenizer = model.model_config, model.tokenizer
  policy = (exit or exits.ExitPolicy(measure='never')).validated()
  if policy.schedule == 'decaying':
    policy = policy.replace(max_len=max_new_tokens)
  sampling = sampling or sampling_lib.Greedy()
  prompt, lengths = decode_lib.pad_prompts([tokenizer.encode(p) for p in prompts],
                                             pad_id=tokenizer.eos_id)

  if speculative is not None:
    if not (isinstance(speculative, (tuple, list)) and len(speculative) == 2):
      raise ValueError(f'speculative={speculative!r}: expected (draft_depth E, num_draft k)')
    draft_depth, num_draft = speculative
    speculative_lib.validate_args(cfg, draft_depth, num_draft)
    if exit is not None or not isinstance(sampling, sampling_lib.Greedy) or kv != 'propagate':
      raise ValueError('speculative=(E, k) decodes greedily at full-depth quality: leave exit=,'
                       ' kv= and sampling= unset')

  def run(params, prompt, lengths, policy, sampling, rng, classifier):
    if speculative is not None:
      return speculative_lib.generate_speculative(
          cfg, params, prompt, lengths, max_new_tokens=max_new_tokens,
          draft_depth=draft_depth, num_draft=num_draft, eos_id=tokenizer.eos_id,
          pad_id=tokenizer.eos_id)
    return generation.generate_tokens(
        cfg, params, prompt, lengths, max_new_tokens=max_new_tokens, policy=policy,
        sampling=sampling, rng=rng, eos_id=tokenizer.eos_id, pad_id=tokenizer.eos_id,
        classifier=classifier, kv=kv, queue_capacity=queue_capacity)

  args = (model.decode_params, jnp.asarray(prompt), jnp.asarray(lengths), policy, sampling,
          jax.random.key(seed), classifier)
  static = (cfg, max_new_tokens, kv, queue_capacity, speculative, tokenizer.eos_id)
  compiled, compile_seconds = _program(static, run, args)
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - start

  counts = np.asarray(out.num_generated)
  tokens = [np.asarray(out.tokens[b, :counts[b]]).tolist() for b in range(len(prompts))]
  depths = [np.asarray(out.exit_depth[b, :counts[b]]).tolist() for b in range(len(prompts))]
  # The first token of each row comes from the full-depth prefill, not from the depth loop:
  # depth statistics and FLOPs cover the decode steps (the full-depth cost when there are
  # none).
  decoded = np.concatenate([np.asarray(d[1:]) for d in depths] + [np.zeros(0, int)])
  context = float(np.mean(lengths)) + max_new_tokens / 2.0
  full = costs.full_depth_flops(cfg, context)
  if speculative is not None:
    spent = full * float(np.mean(speculative_lib.speculative_flops(
        cfg, np.asarray(out.rounds), num_draft, draft_depth, counts, context)))
  elif decoded.size:
    spent = costs.token_flops(cfg, decoded, policy.measure, context,
                              int(np.asarray(policy.min_depth)), kv=kv).mean()
  else:
    spent, decoded = full, np.full(1, cfg.num_layers)
  stats = {
      'mean_depth': float(decoded.mean()),
      'relative_depth': float(decoded.mean() / cfg.num_layers),
      'relative_flops': float(spent / full),
      'tokens_per_second': float(counts.sum() / seconds),
      'seconds': seconds,
      'compile_seconds': compile_seconds,
      'batch': len(prompts),
  }
  return GenerateOutput(texts=[tokenizer.decode(t) for t in tokens], tokens=tokens,
                        exit_depths=depths, stats=stats)
