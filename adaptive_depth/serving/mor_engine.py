"""The depth-wise batching engine for Mixture-of-Recursions models.

Every slot holds one token at its own recursion. A tick runs the K shared blocks once for
all slots, each slot at its own loop step (1 + r_i K + j) with its own KV writes and masks
(kv_cache.cached_call's pieces with a step per row, as the early-exit engine does); then
the router decides, per slot and causally (routers.route, the decision decoding uses),
whether its token runs the next recursion. A token that stops, or has run every
recursion, finishes in the same tick: the last layer, the head, the emitted token, and the
next token's first layer and first routing decision.

The finishing work (two blocks and the head) is not run for every slot: at most F slots
finish per tick (`finish_slots`; default S / the mean recursions the training capacities
give, with headroom), gathered into a sub-batch of static size F and scattered back. Past F, slots wait,
running nothing; priority rotates with the tick count, so no slot waits more than S / F
ticks. A tick costs K x S + 2 x F block rows; a token costs its recursions in ticks (plus
any wait).

State: the early-exit engine's DecodeState (engine.py) plus `ran` [S, C] (recursions the
token at each cached position ran: the 'recursion_wise' mask), the slots' RouteState, and
`finishing` [S] (stopped, waiting to finish). `step` is the slot's recursion.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth import routers
from adaptive_depth.decode import kv_cache
from adaptive_depth.decode import mor_decode
from adaptive_depth.serving import engine as engine_lib

Prefix = engine_lib.Prefix


@flax.struct.dataclass
class RoutedPrefix:
  """A prompt's cache row (Prefix) and its `ran` row [C]."""
  prefix: engine_lib.Prefix
  ran: jax.Array


@flax.struct.dataclass
class RoutedDecodeState(engine_lib.DecodeState):
  ran: jax.Array = None          # [S, C] int32
  route: routers.RouteState = None  # per slot [S]
  gate: jax.Array = None         # [S] the router's gate for the slot's next recursion
  finishing: jax.Array = None    # [S] bool


def default_finish_slots(cfg: model_lib.ModelConfig, slots: int, every_recursion: bool) -> int:
  """1.5 S / expected recursions per token (expert_choice: the sum of the capacities;
  token_choice: (N_r + 1) / 2; every recursion: N_r), rounded up, at most S. The 1.5 is
  headroom: decoding's causal decisions need not keep the training capacities (the
  configs/mor.py model runs 1.58 recursions a token, not 2), and at 16 slots 12 finishing
  slots decoded 7% faster than 8 on a 32-request stream, 16 slower again."""
  routing = cfg.routing
  if every_recursion:
    expected = routing.recursions
  elif routing.routing == 'expert_choice':
    expected = sum(routing.capacities)
  else:
    expected = (routing.recursions + 1) / 2
  return max(1, min(slots, math.ceil(1.5 * slots / expected)))


def empty_state(cfg: model_lib.ModelConfig, slots: int, cache_len: int) -> RoutedDecodeState:
  """Every slot free (the early-exit engine's empty state, plus the routed fields)."""
  base = engine_lib.empty_state(cfg, slots, cache_len)
  fields = {f: getattr(base, f) for f in base.__dataclass_fields__ if getattr(base, f) is not None}
  return RoutedDecodeState(
      **fields, ran=jnp.zeros((slots, cache_len), jnp.int32),
      route=routers.RouteState.start((slots,), cfg.routing.recursions),
      gate=jnp.zeros((slots,), jnp.float32), finishing=jnp.zeros((slots,), bool))


def prefill(cfg: model_lib.ModelConfig, params, prompt, length, cache_len: int, threshold,
            every_recursion: bool = False) -> RoutedPrefix:
  """prompt: [P] int32 left-aligned; length: scalar int32."""
  cache, logits = mor_decode.prefill(cfg, params, prompt[None], length[None], cache_len,
                                     threshold, every_recursion)
  return RoutedPrefix(prefix=Prefix(k=cache.cache.k[:, 0], v=cache.cache.v[:, 0],
                                    logits=logits[0], length=length), ran=cache.ran[0])


def _rows_block(cfg, params, cache, block, step, slots, h, positions, write, mask,
                read_step=None):
  """Block `block` (static) at loop step `step` ([F] or scalar) for the cache rows `slots`
  [F]: h [F, 1, D] at positions [F, 1]; K/V stored where write [F] (at `step`), attention
  reads each row's layer at read_step (default step) under mask [F, 1, C]
  (kv_cache.cached_call on those rows)."""
  steps = jnp.broadcast_to(jnp.asarray(step), slots.shape)
  return kv_cache.cached_call(
      cache, steps, positions,
      lambda attend_to: model_lib.apply_block_rows(cfg, params, block, steps, h, positions,
                                                   mask, attend_to),
      lambda: model_lib.apply_block_rows(cfg, params, block, steps, h, positions,
                                         kv_only=True),
      keep=write[:, None], read_steps=read_step, rows=slots)


def _start_tokens(cfg, params, cache, ran, slots, tokens, position, write, threshold,
                  forced):
  """The first layer and the recursion-0 decision for new tokens in rows `slots` [F] at
  position [F]; only rows in `write` [F] touch the cache and `ran`. Returns (h [F, D],
  runs [F], gate [F], RouteState [F], cache, ran)."""
  positions = position[:, None]
  ran = ran.at[slots, position].set(jnp.where(write, 0, ran[slots, position]))
  visible = (jnp.arange(cache.length)[None, :] <= positions)[:, None, :]
  h = model_lib.embed(cfg, params, tokens[:, None])
  h, cache = _rows_block(cfg, params, cache, 0, 0, slots, h, positions, write, visible)
  route = routers.RouteState.start(slots.shape, cfg.routing.recursions)
  runs, gate, route = routers.route(cfg.routing, params['routers'], h[:, 0], 0, route,
                                    threshold, forced)
  return h[:, 0], runs, gate, route, cache, ran


def insert(cfg: model_lib.ModelConfig, params, prefix: RoutedPrefix, state: RoutedDecodeState,
           slot, request, max_new, eos_id, sampling, rng, threshold,
           every_recursion: bool = False) -> RoutedDecodeState:
  """The early-exit engine's insert, then the first token's first layer and its recursion-0
  decision (a token that runs no recursion waits to finish)."""
  state = engine_lib.insert(cfg, params, prefix.prefix, state, slot, request, max_new, eos_id,
                            sampling, rng)
  ran = state.ran.at[slot].set(prefix.ran)
  slots = jnp.asarray(slot, jnp.int32)[None]
  forced = routers.every_recursion(cfg.routing, (1,)) if every_recursion else None
  live = state.live[slots]
  h, runs, gate, route, cache, ran = _start_tokens(
      cfg, params, state.cache, ran, slots, state.token[slots], state.position[slots], live,
      threshold, forced)
  set_row = lambda field, value: field.at[slot].set(value[0])
  return state.replace(
      cache=cache, ran=ran, h=set_row(state.h, h),
      route=jax.tree.map(set_row, state.route, route), gate=set_row(state.gate, gate),
      finishing=set_row(state.finishing, live & ~runs))


def _recursions(cfg, params, state: RoutedDecodeState, runs):
  """The K shared blocks once for every slot, each at its own recursion; K/V written and
  `ran` counted where `runs` [S]. Returns (h_out [S, D], cache, ran)."""
  routing, per = cfg.routing, cfg.num_blocks - 2
  slots = jnp.arange(runs.shape[0])
  positions = state.position[:, None]
  r = state.step
  ran = state.ran.at[slots, state.position].add(runs.astype(jnp.int32))
  visible = jnp.arange(state.cache.length)[None, :] <= positions  # [S, C]
  shared = routing.kv == 'shared'
  mask = (visible if shared else visible & (ran > r[:, None]))[:, None, :]
  x, cache = state.h[:, None], state.cache
  for j in range(per):
    step = 1 + r * per + j
    write = runs & (r == 0) if shared else runs
    x, cache = _rows_block(cfg, params, cache, 1 + j, step, slots, x, positions, write, mask,
                           read_step=1 + j if shared else None)
  return x[:, 0], cache, ran


def tick(cfg: model_lib.ModelConfig, params, state: RoutedDecodeState, threshold, eos_id,
         sampling, rng, finish_slots: int, every_recursion: bool = False) -> RoutedDecodeState:
  """One pass of the shared blocks over the slots that run a recursion, the routers'
  decisions, and the finishing work of up to finish_slots stopped slots."""
  routing = cfg.routing
  live = state.live
  runs = live & ~state.finishing
  # No lax.cond around this or _finish below, although a tick may have nothing for one of
  # them: under a cond XLA copied the whole cache (16 slots, 176 positions: 7.7 ms a tick
  # with both in conds, 2.7 ms without, and the tick time then grew with cache_len).
  x, cache, ran = _recursions(cfg, params, state, runs)
  h = routers.gated_update(state.h, x, state.gate, runs)  # gate: decided with this recursion
  step = state.step + runs
  # The decision for the next recursion, from the state this one left.
  forced = routers.every_recursion(routing, step.shape) if every_recursion else None
  more, next_gate, route = routers.route(routing, params['routers'], h, jnp.minimum(
      step, routing.recursions - 1), state.route, threshold, forced)
  more = more & (step < routing.recursions)
  route = jax.tree.map(lambda new, old: jnp.where(runs, new, old), route, state.route)
  finishing = state.finishing | (runs & ~more)
  state = state.replace(cache=cache, ran=ran, h=h, step=step, route=route,
                        gate=jnp.where(runs, next_gate, state.gate), finishing=finishing & live)
  state = _finish(cfg, params, state, threshold, eos_id, sampling, rng, finish_slots,
                  every_recursion)
  return state.replace(ticks=state.ticks + 1, live_slot_ticks=state.live_slot_ticks +
                       jnp.sum(live))


def _finish(cfg, params, state: RoutedDecodeState, threshold, eos_id, sampling, rng,
            finish_slots: int, every_recursion: bool) -> RoutedDecodeState:
  """Up to finish_slots finishing slots, gathered: last layer, head, emitted token, and the
  next token's first layer and recursion-0 decision; scattered back."""
  num_layers, per = cfg.num_layers, cfg.num_blocks - 2
  count_slots = state.finishing.shape[0]
  # Round-robin priority among finishing slots: slot i ranks (i - ticks) mod S.
  rank = (jnp.arange(count_slots) - state.ticks) % count_slots
  score = jnp.where(state.finishing, 2.0 * count_slots - rank, 0.0)
  taken, slots = jax.lax.top_k(score, finish_slots)
  valid = taken > 0
  positions = state.position[slots][:, None]
  visible = (jnp.arange(state.cache.length)[None, :] <= positions)[:, None, :]
  h = state.h[slots][:, None]
  h, cache = _rows_block(cfg, params, state.cache, cfg.num_blocks - 1, num_layers - 1, slots,
                         h, positions, valid, visible)
  logits = model_lib.head_logits(cfg, params, h[:, 0])
  request, count = state.request[slots], state.count[slots]
  new_token = engine_lib.choose_tokens(logits, sampling, rng, request, count)
  depth = 2 + state.step[slots] * per
  cache_len = state.tokens.shape[1]
  at = jnp.where(valid, count, cache_len)  # invalid rows write nowhere
  tokens = state.tokens.at[slots, at].set(new_token, mode='drop')
  exit_depth = state.exit_depth.at[slots, at].set(depth, mode='drop')
  new_count = count + 1
  done_now = valid & ((new_token == eos_id) | (new_count >= state.max_new[slots]))
  next_input = valid & ~done_now
  position = jnp.minimum(state.position[slots] + 1, state.cache.length - 1)
  forced = routers.every_recursion(cfg.routing, slots.shape) if every_recursion else None
  h_next, runs, gate, route, cache, ran = _start_tokens(
      cfg, params, cache, state.ran, slots, new_token, position, next_input, threshold, forced)
  # Rows of the sub-batch that start no token (not finishing, or done) keep every field.
  put = lambda field, value, keep: field.at[slots].set(jnp.where(keep, value, field[slots]))
  starts = next_input
  return state.replace(
      cache=cache, ran=ran, tokens=tokens, exit_depth=exit_depth,
      count=put(state.count, new_count, valid),
      h=put(state.h, h_next, starts[:, None]),
      token=put(state.token, new_token, starts), position=put(state.position, position, starts),
      step=put(state.step, jnp.zeros_like(position), starts),
      route=jax.tree.map(lambda f, v: put(f, v, starts), state.route, route),
      gate=put(state.gate, gate, starts),
      finishing=put(state.finishing, next_input & ~runs, valid),
      live=put(state.live, ~done_now, valid),
      done=put(state.done, done_now, valid) | state.done)


@flax.struct.dataclass
class _Chunk:
  """The carry of one chunk of ticks: ticks run so far, and the slot table."""
  ticks_run: jax.Array
  state: RoutedDecodeState


def generate(cfg: model_lib.ModelConfig, params, state: RoutedDecodeState, policy: exits.ExitPolicy,
             num_ticks, eos_id, sampling, rng, finish_slots: int) -> RoutedDecodeState:
  """Up to num_ticks ticks on device; stops early when no slot is live. policy: measure
  'router' (threshold: expert-choice's sigmoid threshold) or 'never' (every recursion)."""
  every = policy.measure == 'never'

  def body(chunk):
    return _Chunk(ticks_run=chunk.ticks_run + 1,
                  state=tick(cfg, params, chunk.state, policy.threshold, eos_id, sampling, rng,
                             finish_slots, every))

  return jax.lax.while_loop(
      lambda c: (c.ticks_run < num_ticks) & jnp.any(c.state.live), body,
      _Chunk(ticks_run=jnp.int32(0), state=state)).state
