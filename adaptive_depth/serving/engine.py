"""The depth-wise batching engine on device: a fixed table of slots, each at its own depth.

For a model whose loop reuses shared blocks (schedule 'cycle' with B blocks dividing
num_layers, or a single block), tokens at different loop steps call the same weights, so
one call of each block serves every slot, whatever step each slot is at. Per-step LoRA
deltas are applied unmerged, with each slot's own factors (model.apply_block_rows).

One tick runs the B blocks once: sub-step b applies block b to every slot, each at its own
position and loop step (step_i + b). A slot's step is a multiple of B at every tick start,
so sub-step b runs block b for all slots at once. Exit checks happen only at loop
boundaries (after block B-1): a slot that left in the middle of a loop would start its next
token at block 0 while the others continue at block b + 1, and one call per block per tick
would no longer serve all slots. A single-block model (B = 1) checks after every step.

A slot that exits emits its token (greedy or sampled from its exit head's logits), writes
the K/V of the steps it skipped from its frozen state (KV policy 'propagate', as
adaptive_decode.decode_step does) and starts its request's next token at step 0. A request
that reaches EOS or its max_new_tokens is done and its slot stops (the host refills it:
continuous batching).

The interface has the shape of JetStream's engine API: `prefill` a prompt into a Prefix,
`insert` a prefix into a slot of the DecodeState, `generate` advances the DecodeState by a
chunk of ticks in one `lax.while_loop`. Shapes depend only on (slots, cache_len); policy
values, prompts and refills are traced, so a threshold sweep or a refill compiles nothing.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import kv_cache
from adaptive_depth.decode import sampling as sampling_lib

KV_POLICIES = ('propagate',)
# Measures the engine can decide with: every one but the oracle, which needs the full
# model's choice before the token is computed, and the routers of Mixture-of-Recursions
# models ('classifier' takes the classifier's params).
MEASURES = tuple(m for m in exits.MEASURES if m not in ('oracle', 'router'))


@flax.struct.dataclass
class Prefix:
  """A prompt run at full depth. k, v: one row of the cache (kv_cache.Cache's layout);
  logits: [V] float32 at the last prompt token (the first new token is chosen from them
  when the prefix is inserted, with the request's own random key); length: scalar int32
  prompt length (the first token's position)."""
  k: jax.Array
  v: jax.Array
  logits: jax.Array
  length: jax.Array


@flax.struct.dataclass
class DecodeState:
  """The slot table (S slots). Per slot: the request it serves (-1: never used), the token
  being computed (its input token, position, loop step at the tick start, hidden state
  h [S, D], state at its previous exit check h_previous [S, D] for 'saturation'), its row of
  the cache (kv_cache.Cache's layout, one layer per loop step), what it has emitted
  (tokens, exit_depth [S, cache_len]; count [S]) out of max_new [S], live (still
  decoding) and done (finished, waiting for the host to collect it). Counters: ticks run and
  live_slot_ticks (slot-ticks spent on a live token)."""
  cache: kv_cache.Cache
  h: jax.Array
  h_previous: jax.Array
  token: jax.Array
  position: jax.Array
  step: jax.Array
  request: jax.Array
  tokens: jax.Array
  exit_depth: jax.Array
  count: jax.Array
  max_new: jax.Array
  live: jax.Array
  done: jax.Array
  ticks: jax.Array
  live_slot_ticks: jax.Array


def schedule_error(cfg: model_lib.ModelConfig):
  """A message saying why the engine cannot run this model's schedule, or None."""
  blocks, layers_ = cfg.num_blocks, cfg.num_layers
  cyclic = layers_ % blocks == 0 and (
      model_lib.block_table(cfg) == np.arange(layers_) % blocks).all()
  if not cyclic or (cfg.schedule != 'cycle' and blocks != 1):
    return (f'config.model.schedule={cfg.schedule!r} with num_blocks={blocks} and '
            f'num_layers={layers_}: the engine serves shared-block models only, allowed: '
            "schedule 'cycle' with num_blocks dividing num_layers, or a single block")
  off_boundary = [d for d in cfg.exit_depths if d % blocks]
  if off_boundary:
    return (f'config.model.exit_layers gives exit depths {off_boundary} that are not loop '
            f'boundaries (multiples of num_blocks={blocks}): the engine checks exits only '
            'after the last block of a loop')
  return None


def empty_state(cfg: model_lib.ModelConfig, slots: int, cache_len: int) -> DecodeState:
  """Every slot free (not live, not done)."""
  # Every field its own buffer: the state is donated to the programs that update it.
  zeros = lambda shape, dtype=jnp.int32: jnp.zeros(shape, dtype)
  hidden = lambda: zeros((slots, cfg.width), cfg.compute_dtype)
  return DecodeState(
      cache=kv_cache.empty(cfg, slots, cache_len),
      h=hidden(), h_previous=hidden(), token=zeros((slots,)), position=zeros((slots,)),
      step=zeros((slots,)), request=jnp.full((slots,), -1, jnp.int32),
      tokens=zeros((slots, cache_len)), exit_depth=zeros((slots, cache_len)),
      count=zeros((slots,)), max_new=zeros((slots,)), live=zeros((slots,), bool),
      done=zeros((slots,), bool), ticks=zeros(()), live_slot_ticks=zeros(()))


def prefill(cfg: model_lib.ModelConfig, params, prompt, length, cache_len: int) -> Prefix:
  """prompt: [P] int32 left-aligned (P padded; pad tokens sit at positions the mask hides
  until real tokens overwrite them); length: scalar int32."""
  cache, logits = decode_lib.prefill(cfg, params, prompt[None], length[None], cache_len)
  return Prefix(k=cache.k[:, 0], v=cache.v[:, 0], logits=logits[0], length=length)


def choose_tokens(logits, sampling, rng, request, index):
  """The token each slot emits. logits: [S, V]; request, index: [S] int32 (the request and
  the token's index among its new tokens). Each token's random key is
  fold_in(fold_in(rng, request), index), so a request draws the same tokens whichever slot
  serves it and whatever else is in the table. Returns [S] int32."""
  if isinstance(sampling, sampling_lib.Greedy):
    return jnp.argmax(logits, -1).astype(jnp.int32)
  keys = jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(rng, r), i))(
      request, index)
  one = lambda row_logits, key: sampling_lib.next_token(row_logits[None], sampling, key)[0]
  return jax.vmap(one)(logits, keys)


def insert(cfg: model_lib.ModelConfig, params, prefix: Prefix, state: DecodeState, slot,
           request, max_new, eos_id, sampling, rng) -> DecodeState:
  """state with request `request` (scalar int32) admitted into slot `slot` (scalar int32).

  The slot's whole cache row is overwritten with the prefix's (zeros past the prompt), so
  nothing of a previous occupant can be read; no other slot changes. The first token
  (depth num_layers, chosen from the prefill's logits) is emitted at once; the request is
  done at once when it is EOS or max_new is 1.
  """
  first = choose_tokens(prefix.logits[None], sampling, rng, request[None],
                        jnp.zeros((1,), jnp.int32))[0]
  h = model_lib.embed(cfg, params, first[None, None])[0, 0]
  finished = (first == eos_id) | (max_new <= 1)
  set_row = lambda field, value: field.at[slot].set(value)
  tokens_row = jnp.zeros(state.tokens.shape[1], jnp.int32).at[0].set(first)
  depth_row = jnp.zeros(state.tokens.shape[1], jnp.int32).at[0].set(cfg.num_layers)
  return state.replace(
      cache=kv_cache.Cache(k=state.cache.k.at[:, slot].set(prefix.k),
                           v=state.cache.v.at[:, slot].set(prefix.v)),
      h=set_row(state.h, h), h_previous=set_row(state.h_previous, h),
      token=set_row(state.token, first), position=set_row(state.position, prefix.length),
      step=set_row(state.step, 0), request=set_row(state.request, request),
      tokens=set_row(state.tokens, tokens_row), exit_depth=set_row(state.exit_depth, depth_row),
      count=set_row(state.count, 1), max_new=set_row(state.max_new, max_new),
      live=set_row(state.live, ~finished), done=set_row(state.done, finished))


def _run_blocks(cfg, params, state: DecodeState) -> tuple[jax.Array, kv_cache.Cache]:
  """One pass over the B blocks for every slot, each at its own position and step.
  Returns (h [S, D] after the pass, cache with each slot's K/V written at
  [step_i + b, i, position_i])."""
  cache_len = state.cache.length
  positions = state.position[:, None]
  # A free slot sees no key: its output is dropped (tick keeps its state), and the cache
  # read of a tick then reaches only as far as the live slots' positions.
  mask = ((jnp.arange(cache_len)[None, :] <= state.position[:, None])
          & state.live[:, None])[:, None, :]  # [S, 1, C]
  h, cache = state.h[:, None], state.cache
  for block in range(cfg.num_blocks):
    steps = state.step + block
    h, cache = kv_cache.cached_call(
        cache, steps, positions,
        lambda attend_to, block=block, steps=steps, h=h: model_lib.apply_block_rows(
            cfg, params, block, steps, h, positions, mask, attend_to),
        lambda block=block, steps=steps, h=h: model_lib.apply_block_rows(
            cfg, params, block, steps, h, positions, kv_only=True))
  return h[:, 0], cache


def _propagate(cfg, params, cache, h, position, leaving, exit_depth):
  """KV policy 'propagate': for each slot in `leaving` [S], the K/V of every step it skipped
  (exit_depth <= s < num_layers) computed from its frozen state h [S, D], written at its
  position in one scatter (the other slots' and steps' entries are dropped). Without LoRA
  the frozen state gives one block the same K/V at every step that runs it, so each
  block's K/V is computed once and placed at all its steps."""
  slots, num_layers = h.shape[0], cfg.num_layers
  positions = position[:, None]

  def kv_at(step):
    steps = jnp.full((slots,), step, jnp.int32)
    block = int(model_lib.block_table(cfg)[step])
    return model_lib.apply_block_rows(cfg, params, block, steps, h[:, None], positions,
                                      kv_only=True)  # [S, 1, KV, Dh] each

  if 'lora' in params:  # every step has LoRA factors of its own
    per_step = [kv_at(step) for step in range(num_layers)]
  else:
    per_block = [kv_at(block) for block in range(cfg.num_blocks)]
    per_step = [per_block[block] for block in model_lib.block_table(cfg)]
  k = jnp.concatenate([k for k, _ in per_step], axis=1)  # [S, L, KV, Dh]
  v = jnp.concatenate([v for _, v in per_step], axis=1)
  steps = jnp.broadcast_to(jnp.arange(num_layers)[None, :], (slots, num_layers))
  wanted = leaving[:, None] & (steps >= exit_depth[:, None])
  return kv_cache.store(cache, steps, k, v, jnp.broadcast_to(positions, steps.shape),
                        keep=wanted)


def tick(cfg: model_lib.ModelConfig, params, state: DecodeState, policy: exits.ExitPolicy,
         eos_id, sampling, rng, classifier=None) -> DecodeState:
  """One pass of the shared blocks over all slots, then each slot's own exit decision
  (adaptive_decode.exit_check, with a depth per slot)."""
  num_layers = cfg.num_layers
  live = state.live
  h_new, cache = _run_blocks(cfg, params, state)
  h = jnp.where(live[:, None], h_new, state.h)
  depth = state.step + cfg.num_blocks  # [S], a loop boundary for every slot
  if policy.schedule == 'decaying':  # its N: each request's own max_new
    policy = policy.replace(max_len=state.max_new.astype(jnp.float32))
  at_bottom = live & (depth == num_layers)
  # Slots at the bottom take their logits (the last exit's head) from the check's head call.
  # The t of the decaying threshold: the emitted token's index among new tokens, minus one
  # (as generation.generate_tokens counts it).
  checked = decode_lib.exit_check(
      cfg, params, policy, classifier, depth, h[:, None],
      decode_lib.ExitState.start(cfg, state.h_previous[:, None], live),
      state.count - 1, at_last=at_bottom)
  leaving = live & ~checked.active
  logits = checked.exit_logits
  # Under a lax.cond: ticks where no slot leaves skip it, and with it XLA's scatter into
  # the cache (interleaved tick timings at 16 slots: running it unconditionally cost
  # 0.5-0.7 ms a tick, at full depth and at max_prob 0.7 alike).
  cache = jax.lax.cond(jnp.any(leaving),
                       lambda c: _propagate(cfg, params, c, h, state.position, leaving, depth),
                       lambda c: c, cache)

  # Slots whose token is finished emit it and start the next one at step 0.
  finishing = leaving | at_bottom
  new_token = choose_tokens(logits, sampling, rng, state.request, state.count)
  rows = jnp.arange(live.shape[0])
  slot_write = lambda buffer, value: buffer.at[rows, state.count].set(
      jnp.where(finishing, value, buffer[rows, state.count]))
  tokens = slot_write(state.tokens, new_token)
  exit_depth = slot_write(state.exit_depth, depth)
  count = state.count + finishing
  done_now = finishing & ((new_token == eos_id) | (count >= state.max_new))
  next_input = finishing & ~done_now
  h_next = model_lib.embed(cfg, params, new_token[:, None])[:, 0]
  h = jnp.where(next_input[:, None], h_next, h)
  h_previous = checked.h_previous[:, 0]
  return state.replace(
      cache=cache, h=h, h_previous=jnp.where(next_input[:, None], h_next, h_previous),
      token=jnp.where(next_input, new_token, state.token),
      position=state.position + next_input,
      step=jnp.where(next_input, 0, jnp.where(live & ~finishing, depth, state.step)),
      tokens=tokens, exit_depth=exit_depth, count=count, live=live & ~done_now,
      done=state.done | done_now, ticks=state.ticks + 1,
      live_slot_ticks=state.live_slot_ticks + jnp.sum(live))


@flax.struct.dataclass
class _Chunk:
  """The carry of one chunk of ticks: ticks run so far in this chunk, and the slot table."""
  ticks_run: jax.Array
  state: DecodeState


def generate(cfg: model_lib.ModelConfig, params, state: DecodeState, policy: exits.ExitPolicy,
             num_ticks, eos_id, sampling=sampling_lib.Greedy(), rng=None,
             classifier=None) -> DecodeState:
  """Up to num_ticks (traced) ticks on device; stops early when no slot is live.
  classifier: the exit classifier's parameters, for policy.measure 'classifier'."""
  def cond(chunk):
    return (chunk.ticks_run < num_ticks) & jnp.any(chunk.state.live)

  def body(chunk):
    return _Chunk(ticks_run=chunk.ticks_run + 1,
                  state=tick(cfg, params, chunk.state, policy, eos_id, sampling, rng,
                             classifier))

  return jax.lax.while_loop(cond, body, _Chunk(ticks_run=jnp.int32(0), state=state)).state
