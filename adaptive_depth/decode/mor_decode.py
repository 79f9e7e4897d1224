"""Mixture-of-Recursions decoding with a KV cache: causal routing, per row, batched.

The public MoR code has no decode path: its expert-choice top-k is over the whole sequence,
which at decode length 1 keeps every token. Here every token decides for itself, as it is
decoded (routers.route): expert_choice runs recursion r while sigmoid(router_r(h)) >
threshold (recursions trained at capacity 1 always run), token_choice while r < the depth
its router chose. The auxiliary BCE loss of training is what makes the first rule agree
with the training-time top-k (figures in the README).

KV, in the cache's per-step layers (kv_cache.Cache: one layer per loop step):
- 'recursion_wise': a token writes K/V at the steps of the recursions it runs, and at
  recursion r attends only to the positions that ran r. `ran` [B, S] (recursions each
  cached position ran) rides beside the cache and makes that mask.
- 'shared': recursion 0 runs every token and writes its K/V; later recursions attend to
  recursion 0's layers (the same block's) and write nothing.

`run_tokens` is the whole pass, for a prompt (prefill, T = P) and for one new token per row
(decode, T = 1) alike: the first layer, a lax.while_loop over recursions that stops once no
token runs the next one (at batch 1 a shallow token pays for the recursions it runs only),
the last layer. Block calls go through kv_cache.cached_call, as every decode path's do.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from adaptive_depth import model as model_lib
from adaptive_depth import routers
from adaptive_depth.decode import kv_cache


@flax.struct.dataclass
class RoutedCache:
  """The cache and, per row and position, how many recursions the token there ran."""
  cache: kv_cache.Cache
  ran: jax.Array  # [B, S] int32

  @classmethod
  def empty(cls, cfg: model_lib.ModelConfig, batch: int, cache_len: int) -> 'RoutedCache':
    return cls(cache=kv_cache.empty(cfg, batch, cache_len),
               ran=jnp.zeros((batch, cache_len), jnp.int32))


@flax.struct.dataclass
class _RecursionLoop:
  """The carry of the loop over recursions: the recursion about to run, the tokens' states
  h [B, T, D], their routing so far, and the cache."""
  recursion: jax.Array
  h: jax.Array
  route: routers.RouteState
  cache: RoutedCache


def _cached_block(cfg, params, cache: kv_cache.Cache, step, h, positions, mask, write,
                  read_step=None):
  """Loop step `step` on h [B, T, D] against the cache (kv_cache.cached_call). write:
  [B, T] bool, the entries whose K/V are stored at `step` (None: all); read_step: the step
  whose layer attention reads (default `step`; 'shared' reads recursion 0's).
  Returns (h, cache)."""
  return kv_cache.cached_call(
      cache, step, positions,
      lambda attend_to: model_lib.apply_step(cfg, params, step, h, positions, mask, attend_to),
      lambda: model_lib.apply_step(cfg, params, step, h, positions, kv_only=True),
      keep=write, read_steps=read_step)


def run_tokens(cfg: model_lib.ModelConfig, params, cache: RoutedCache, tokens, positions,
               threshold, forced_depth=None, every_recursion: bool = False):
  """Tokens [B, T] at positions [B, T] (each row's in increasing order) through the MoR
  model against the cache, writing their K/V and `ran`. threshold: expert_choice's sigmoid
  threshold (traced); forced_depth: [B, T] recursions to run instead of the routers';
  every_recursion (static): every token runs every recursion (the full-compute baseline).
  Returns (cache, h [B, T, D] after the last layer, recursions run [B, T] int32)."""
  routing = cfg.routing
  per = cfg.num_blocks - 2
  batch, length = tokens.shape
  if every_recursion:
    forced_depth = routers.every_recursion(routing, (batch, length))
  cache_len = cache.cache.length
  rows = jnp.arange(batch)[:, None]
  visible = jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]  # [B, T, S]
  ran = cache.ran.at[rows, positions].set(0)  # these positions' tokens are new
  h = model_lib.embed(cfg, params, tokens)
  h, kv = _cached_block(cfg, params, cache.cache, 0, h, positions, visible, None)
  shared = routing.kv == 'shared'

  def body(loop: _RecursionLoop) -> _RecursionLoop:
    r = loop.recursion
    runs, gate, route = routers.route(routing, params['routers'], loop.h, r, loop.route,
                                      threshold, forced_depth)
    ran = loop.cache.ran.at[rows, positions].add(runs.astype(jnp.int32))
    if shared:
      mask = visible
    else:
      mask = visible & (ran[:, None, :] > r)
    x, kv = loop.h, loop.cache.cache
    for j in range(per):
      step = 1 + r * per + j
      if shared:  # recursion 0 writes for every token; later ones read its layers (step
        # 1 + j is recursion 0's own step, so one call serves both: no lax.cond, which
        # made XLA copy the cache in the engine)
        x, kv = _cached_block(cfg, params, kv, step, x, positions, mask, runs & (r == 0),
                              read_step=1 + j)
      else:
        x, kv = _cached_block(cfg, params, kv, step, x, positions, mask, runs)
    h = routers.gated_update(loop.h, x, gate, runs)
    return _RecursionLoop(recursion=r + 1, h=h, route=route,
                          cache=RoutedCache(cache=kv, ran=ran))

  loop = jax.lax.while_loop(
      lambda loop: (loop.recursion < routing.recursions) & jnp.any(loop.route.running), body,
      _RecursionLoop(recursion=jnp.int32(0), h=h,
                     route=routers.RouteState.start((batch, length), routing.recursions),
                     cache=RoutedCache(cache=kv, ran=ran)))
  h, kv = _cached_block(cfg, params, loop.cache.cache, cfg.num_layers - 1, loop.h, positions,
                        visible, None)
  return RoutedCache(cache=kv, ran=loop.cache.ran), h, loop.route.ran


def prefill(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, cache_len: int,
            threshold, every_recursion: bool = False):
  """Left-aligned prompts [B, P] (pads after each row's length are overwritten by its later
  tokens before anything reads them). Returns (cache, logits [B, V] at each row's last
  prompt token)."""
  batch = prompt.shape[0]
  cache = RoutedCache.empty(cfg, batch, cache_len)
  cache, h, _ = run_tokens(cfg, params, cache, prompt, model_lib.default_positions(prompt),
                           threshold, every_recursion=every_recursion)
  last = h[jnp.arange(batch), prompt_lengths - 1]
  return cache, model_lib.head_logits(cfg, params, last)


def decode_step(cfg: model_lib.ModelConfig, params, cache: RoutedCache, token, position,
                threshold, every_recursion: bool = False):
  """One new token per row: token, position [B]. Returns (cache, logits [B, V], loop depth
  [B]: 2 + recursions run x blocks per recursion)."""
  cache, h, ran = run_tokens(cfg, params, cache, token[:, None], position[:, None], threshold,
                             every_recursion=every_recursion)
  depth = 2 + ran[:, 0] * (cfg.num_blocks - 2)
  return cache, model_lib.head_logits(cfg, params, h[:, 0]), depth
