"""The generation loop: prefill, then a while_loop over positions whose body is one adaptive
decode step of the chosen KV policy, with the cache (and the policy's state) in the carry.

KV policies for the layers a token skipped:
  'propagate': each skipped layer computes the token's K/V from its exited state
               (adaptive_decode.decode_step).
  'parallel':  skipped tokens queue per row and catch up inside the next deep pass, so the
               cache holds exact K/V (parallel_kv.decode_step).
A policy is a decode step plus the state it carries between positions; recursion-wise
caching and recursive KV sharing for shared-block models slot in the same way.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import adaptive_threshold
from adaptive_depth.decode import mor_decode
from adaptive_depth.decode import parallel_kv
from adaptive_depth.decode import sampling as sampling_lib

KV_POLICIES = ('propagate', 'parallel')


@flax.struct.dataclass
class GenerationResult:
  """What generate_tokens returns: the tokens and, for inspection, the final cache (complete:
  the 'parallel' queue is flushed) of the prompt and every generated token but the last; and
  the adaptive threshold's final state (None unless policy.schedule == 'adaptive')."""
  output: decode_lib.GeneratedTokens
  cache: decode_lib.Cache
  adaptive: Any = None


@flax.struct.dataclass
class _PositionLoop:
  """The carry of the loop over new tokens: the index of the token being made, the tokens
  and exit depths so far [B, max_new], the cache, the 'parallel' queue (None otherwise),
  which rows are done, the sampling key, and the adaptive threshold's state (None unless
  policy.schedule == 'adaptive')."""
  index: jax.Array
  tokens: jax.Array
  depths: jax.Array
  cache: decode_lib.Cache
  queue: Any
  done: jax.Array
  rng: jax.Array
  adaptive: Any = None


def default_policy(cfg: model_lib.ModelConfig) -> exits.ExitPolicy:
  """What decoding runs when no policy is given: never exit, or for a Mixture-of-Recursions
  model its routers (expert choice at sigmoid 0.5)."""
  if cfg.routing is not None:
    return exits.ExitPolicy(measure='router', threshold=0.5)
  return exits.ExitPolicy(measure='never')


def check_routing(cfg: model_lib.ModelConfig, policy, kv: str = 'propagate'):
  """A Mixture-of-Recursions model decodes with its routers (or every recursion) and caches
  as config.model.mor.kv says; an early-exit model has no routers. Raises ValueError."""
  if policy is None:
    return
  if cfg.routing is None:
    if policy.measure == 'router':
      raise ValueError("ExitPolicy.measure='router' needs a Mixture-of-Recursions model "
                       '(config.model.mor.routing); this one has no routers')
    return
  if policy.measure not in exits.ROUTED_MEASURES:
    raise ValueError(f'ExitPolicy.measure={policy.measure!r}: a Mixture-of-Recursions model '
                     f'decodes with its routers; allowed: {", ".join(exits.ROUTED_MEASURES)}')
  if policy.schedule != 'constant':
    raise ValueError(f'ExitPolicy.schedule={policy.schedule!r}: the routers\' threshold is '
                     "constant; allowed: 'constant'")
  if kv != 'propagate':
    raise ValueError(f'kv={kv!r}: a Mixture-of-Recursions model caches as its '
                     f"config.model.mor.kv says ({cfg.routing.kv!r}); leave kv unset")


def check_kv_policy(kv: str, queue_capacity: int, policy=None):
  """Raises ValueError naming the argument (before anything compiles)."""
  if kv not in KV_POLICIES:
    raise ValueError(f'kv={kv!r}; allowed: {", ".join(KV_POLICIES)}')
  if policy is not None and policy.schedule == 'adaptive' and kv != 'parallel':
    raise ValueError(f"ExitPolicy.schedule='adaptive' learns from the tokens that catch up "
                     f"under kv='parallel'; got kv={kv!r}")
  if kv == 'parallel' and queue_capacity < 1:
    raise ValueError(f'queue_capacity={queue_capacity}: must be >= 1 for kv=\'parallel\'')


def generate_tokens(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, *,
                    max_new_tokens: int, policy: exits.ExitPolicy, sampling, rng, eos_id: int,
                    pad_id: int, classifier=None, kv: str = 'propagate',
                    queue_capacity: int = 8, return_cache: bool = False,
                    row_max_new=None):
  """prompt: [B, P] left-aligned, prompt_lengths: [B]. The first new token comes from the
  prefill at full depth; every later one from the adaptive decode step. Jit with
  max_new_tokens, kv, queue_capacity and return_cache static. The cache has
  P + max_new_tokens + 1 positions (the last is the 'parallel' policy's write sink).
  row_max_new: [B] int (traced), each row's own budget (<= max_new_tokens): a row is done
  after that many tokens, and the loop stops when every row is done (static batching of
  requests with their own lengths); None: max_new_tokens for every row.

  Returns GeneratedTokens, or a GenerationResult when return_cache.
  """
  check_kv_policy(kv, queue_capacity, policy)
  check_routing(cfg, policy, kv)
  policy = policy.validated(cfg.exit_depths)  # exit_at is checked when it is concrete
  adaptive = policy.schedule == 'adaptive'
  sampling_lib.check_sampling(sampling)
  batch = prompt.shape[0]
  cache_len = prompt.shape[1] + max_new_tokens + 1
  routed = cfg.routing is not None  # Mixture-of-Recursions: its routers decide
  every_recursion = policy.measure == 'never'
  if routed:
    cache, logits = mor_decode.prefill(cfg, params, prompt, prompt_lengths, cache_len,
                                       policy.threshold, every_recursion)
  else:
    cache, logits = decode_lib.prefill(cfg, params, prompt, prompt_lengths, cache_len)
  rng, first_rng = jax.random.split(rng)
  first = sampling_lib.next_token(logits, sampling, first_rng)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  depths = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(cfg.num_layers)
  done = first == eos_id
  if row_max_new is not None:
    done |= jnp.asarray(row_max_new) <= 1
  queue = (parallel_kv.ExitQueue.empty(batch, queue_capacity, cfg.width, cfg.compute_dtype,
                                       len(cfg.exit_depths) if adaptive else 0)
           if kv == 'parallel' else None)

  def step(loop: _PositionLoop, token, position, row_position):
    """One decode step of the KV policy. Returns (cache, queue, logits, exit depth, the
    adaptive threshold's new state or None)."""
    if routed:
      cache, logits, exit_depth = mor_decode.decode_step(
          cfg, params, loop.cache, token, position, policy.threshold, every_recursion)
      return cache, None, logits, exit_depth, None
    if kv == 'parallel':
      now = policy.replace(threshold=loop.adaptive.threshold) if adaptive else policy
      cache, queue, logits, exit_depth, seen = parallel_kv.decode_step(
          cfg, params, loop.cache, loop.queue, token, position, now, row_position, classifier)
      if adaptive:  # rows that are done make no observations
        seen = seen.replace(observed=seen.observed & ~loop.done[:, None])
      return cache, queue, logits, exit_depth, (
          loop.adaptive.observe(policy, seen) if adaptive else None)
    cache, logits, exit_depth, _ = decode_lib.decode_step(
        cfg, params, loop.cache, token, position, policy, row_position, classifier)
    return cache, None, logits, exit_depth, None

  def body(loop: _PositionLoop) -> _PositionLoop:
    i = loop.index
    rng, step_rng = jax.random.split(loop.rng)
    cache, queue, logits, exit_depth, adaptive_state = step(
        loop, loop.tokens[:, i - 1], prompt_lengths + i - 1, jnp.full((batch,), i - 1))
    new = jnp.where(loop.done, pad_id, sampling_lib.next_token(logits, sampling, step_rng))
    done = loop.done | (new == eos_id)
    if row_max_new is not None:
      done |= i + 1 >= jnp.asarray(row_max_new)
    return _PositionLoop(
        index=i + 1, tokens=loop.tokens.at[:, i].set(new),
        depths=loop.depths.at[:, i].set(jnp.where(loop.done, 0, exit_depth)), cache=cache,
        queue=queue, done=done, rng=rng, adaptive=adaptive_state)

  loop = jax.lax.while_loop(
      lambda loop: (loop.index < max_new_tokens) & ~jnp.all(loop.done), body,
      _PositionLoop(index=jnp.int32(1), tokens=tokens, depths=depths, cache=cache,
                    queue=queue, done=done, rng=rng,
                    adaptive=(adaptive_threshold.AdaptiveThreshold.start(policy, batch)
                              if adaptive else None)))
  tokens, depths, cache, queue = loop.tokens, loop.depths, loop.cache, loop.queue
  is_eos = tokens == eos_id
  first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
  if row_max_new is not None:
    first_eos = jnp.minimum(first_eos, jnp.asarray(row_max_new))
  output = decode_lib.GeneratedTokens(tokens=tokens, exit_depth=depths, num_generated=first_eos)
  if not return_cache:
    return output
  if kv == 'parallel':
    cache, _ = parallel_kv.flush(cfg, params, cache, queue)
  return GenerationResult(output=output, cache=cache, adaptive=loop.adaptive)
