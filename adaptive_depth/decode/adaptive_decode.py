"""The pieces of per-row early-exit decoding, and KV policy 'propagate': prefill, the exit
check of one decode step, and a decode step whose body is a masked while_loop over depth
(`generation.generate_tokens` runs the while_loop over positions around it).

The KV cache and the block call against it are kv_cache's (shared with every decode path);
the exit check (`exit_check`, on an ExitState) is shared with 'parallel' and the engine.
Shapes are fixed by (batch, cache_len): one compile serves every prompt, threshold and
sampling setting.

KV policy 'propagate' (CALM): a row that exits at depth e keeps its state frozen; every
deeper layer computes that token's K/V from the frozen state. While other rows are still
active the whole block runs for all rows (the masked update keeps exited rows frozen); once
no row is active the loop stops and the remaining layers compute only K/V (one norm and two
projections per layer), which is where the saving at batch 1 comes from.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import depth as depth_lib
from adaptive_depth import exits
from adaptive_depth import layers
from adaptive_depth import model as model_lib
from adaptive_depth.decode import kv_cache

Cache = kv_cache.Cache


@flax.struct.dataclass
class GeneratedTokens:
  """tokens: [B, max_new] (after EOS: the pad id); exit_depth: [B, max_new] (0 after EOS);
  num_generated: [B] tokens up to and including EOS."""
  tokens: jax.Array
  exit_depth: jax.Array
  num_generated: jax.Array


@flax.struct.dataclass
class ExitState:
  """Per row, one token's way through the depth loop: active (still going deeper),
  exit_depth (num_layers until it leaves), exit_logits [B, V] (of the exit it left at),
  h_previous [B, 1, D] (the state at its previous check, for 'saturation').
  For the adaptive threshold, a record of every check (else None): checks [B, E] (which
  exits checked), check_scores [B, E] and check_argmax [B, E] (the exit's prediction), so
  the full model's prediction can label each of them later."""
  active: jax.Array
  exit_depth: jax.Array
  exit_logits: jax.Array
  h_previous: jax.Array
  checks: Any = None
  check_scores: Any = None
  check_argmax: Any = None

  @classmethod
  def start(cls, cfg: model_lib.ModelConfig, h, active=None,
            record: bool = False) -> 'ExitState':
    """Every row (or those in `active` [B]) entering the loop with state h [B, 1, D];
    record: keep the record of checks (the adaptive threshold's observations)."""
    batch, num_exits = h.shape[0], len(cfg.exit_depths)
    empty = lambda dtype: jnp.zeros((batch, num_exits), dtype) if record else None
    return cls(active=jnp.ones((batch,), bool) if active is None else active,
               exit_depth=jnp.full((batch,), cfg.num_layers, jnp.int32),
               exit_logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32), h_previous=h,
               checks=empty(bool), check_scores=empty(jnp.float32),
               check_argmax=empty(jnp.int32))


@flax.struct.dataclass
class DepthLoop:
  """The carry of one decode step's depth loop: the loop step, the new token's state
  h [B, 1, D], its exits, and the cache."""
  step: jax.Array
  h: jax.Array
  exits: ExitState
  cache: Cache


def prefill(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, cache_len: int):
  """Runs left-aligned prompts [B, P] at full depth. Returns (cache, logits [B, V] at each
  row's last prompt token)."""
  batch = prompt.shape[0]
  positions = model_lib.default_positions(prompt)
  mask = layers.causal_mask(positions, positions)

  def step(step, carry):
    h, cache = carry
    h, (k, v) = model_lib.apply_step(cfg, params, step, h, positions, mask)
    return h, kv_cache.store(cache, step, k, v, positions)

  h, cache = jax.lax.fori_loop(0, cfg.num_layers, step,
                               (model_lib.embed(cfg, params, prompt),
                                kv_cache.empty(cfg, batch, cache_len)))
  last = h[jnp.arange(batch), prompt_lengths - 1]
  return cache, model_lib.head_logits(cfg, params, last)


def exit_check(cfg: model_lib.ModelConfig, params, policy: exits.ExitPolicy, classifier,
               depth, h, state: ExitState, row_position, may_exit=True,
               at_last=None) -> ExitState:
  """The confidence check at loop depth `depth` for one token per row: every decode path's
  exit decision (the depth loops with one depth for all rows, the engine with one per row).

  depth: scalar or [B] (traced); h: [B, 1, D]; row_position: [B] (t of the decaying
  threshold); may_exit: [B] bool or True (a row whose exit is refused keeps going). Rows at
  depths where nobody may leave (see depth.checks_at: not an exit, the last depth, below
  policy.min_depth, or anywhere under measure 'never' unless policy.exit_at forces the
  exit) pass through unchanged, their h_previous too; if no row may leave and no row is
  at_last, nothing runs.
  at_last: [B] bool or None, rows at the last depth (the engine's slots finishing a token
  there): they do not check, but their exit_logits are filled from the same head call as
  the checking rows' (one [B, D] x [D, V] product a tick instead of two; a tick whose only
  such rows are at the last depth also computes their confidence, which it discards).
  """
  _, exit_number = depth_lib._exit_lookup(cfg)
  depth = jnp.asarray(depth)
  # Only rows still going deeper check (the engine's free and finished slots keep stale
  # depths, which must not open the check).
  checks = depth_lib.checks_at(cfg, policy, depth) & state.active
  at_last = jnp.zeros_like(checks) if at_last is None else at_last

  def check(state):
    number = exit_number[depth]
    if number.ndim:  # one exit per row: [B] -> [B, 1], broadcastable to h's [B, 1]
      number = number[:, None]
    score, logits = depth_lib.exit_confidence(cfg, params, policy, h, state.h_previous,
                                              number, classifier)
    leaving = (state.active & may_exit & checks
               & depth_lib.exit_decision(policy, score[:, 0], depth, row_position))
    finished = leaving | at_last
    exit_logits = state.exit_logits
    if logits is None:  # a measure that reads no head: pay for it only when a row leaves
      exit_logits = jax.lax.cond(
          jnp.any(finished),
          lambda: jnp.where(finished[:, None], model_lib.head_logits(
              cfg, params, h[:, 0], exit_number[depth]), exit_logits),
          lambda: exit_logits)
    else:
      exit_logits = jnp.where(finished[:, None], logits[:, 0], exit_logits)
    checked = jnp.broadcast_to(checks, leaving.shape)[:, None, None]
    record = {}
    if state.checks is not None:  # the adaptive threshold's record of this check
      here = (jax.nn.one_hot(number.reshape(-1), state.checks.shape[1], dtype=bool)
              & checked[:, 0])  # [B, E]: this row's exit column, where it checked
      record = dict(checks=state.checks | here,
                    check_scores=jnp.where(here, score[:, :1], state.check_scores),
                    check_argmax=jnp.where(here, jnp.argmax(logits[:, 0], -1)[:, None],
                                           state.check_argmax))
    return state.replace(active=state.active & ~leaving,
                         exit_depth=jnp.where(leaving, depth, state.exit_depth),
                         exit_logits=exit_logits,
                         h_previous=jnp.where(checked, h, state.h_previous), **record)

  # Under measure 'never' the check only opens where exit_at forces the exit or a row is
  # at_last (the engine at full depth: the head call then gives those rows their logits).
  # The depth loops pass no at_last, so at full depth they compute no head or confidence
  # here (exit_at is traced: the test itself has to stay).
  return jax.lax.cond(jnp.any(checks | at_last), check, lambda state: state, state)


def final_logits(cfg: model_lib.ModelConfig, params, h, exit_depth, exit_logits):
  """Per row: the exit head at the last depth for rows that went all the way (computed only
  if some row did), else the logits of the exit they left at. h: [B, D] -> [B, V]."""
  full = jax.lax.cond(jnp.any(exit_depth == cfg.num_layers),
                      lambda: model_lib.head_logits(cfg, params, h),  # the last exit's head
                      lambda: exit_logits)
  return jnp.where((exit_depth < cfg.num_layers)[:, None], exit_logits, full)


def decode_step(cfg: model_lib.ModelConfig, params, cache: Cache, token, position,
                policy: exits.ExitPolicy, row_position, classifier=None):
  """One new token per row through the adaptive depth loop, KV policy 'propagate'.

  token, position, row_position: [B] (row_position is t of the decaying threshold).
  Returns (cache, logits [B, V], exit_depth [B], steps_run).
  """
  num_layers, cache_len = cfg.num_layers, cache.length
  positions = position[:, None]
  mask = (jnp.arange(cache_len)[None, :] <= position[:, None])[:, None, :]  # [B, 1, S]
  h0 = model_lib.embed(cfg, params, token[:, None])

  def body(loop: DepthLoop) -> DepthLoop:
    # Rows that exited run the block on their frozen state: their K/V here is propagation.
    h_new, cache = kv_cache.cached_step(cfg, params, loop.cache, loop.step, loop.h,
                                        positions, mask)
    h = jnp.where(loop.exits.active[:, None, None], h_new, loop.h)
    exit_state = exit_check(cfg, params, policy, classifier, loop.step + 1, h, loop.exits,
                            row_position)
    return DepthLoop(step=loop.step + 1, h=h, exits=exit_state, cache=cache)

  loop = jax.lax.while_loop(
      lambda loop: (loop.step < num_layers) & jnp.any(loop.exits.active), body,
      DepthLoop(step=jnp.int32(0), h=h0, exits=ExitState.start(cfg, h0), cache=cache))

  def propagate(carry):  # once no row is active: only the K/V of the remaining steps
    step, cache = carry
    return step + 1, kv_cache.store_kv_only(cfg, params, cache, step, loop.h, positions)

  _, cache = jax.lax.while_loop(lambda c: c[0] < num_layers, propagate,
                                (loop.step, loop.cache))
  exit_state = loop.exits
  logits = final_logits(cfg, params, loop.h[:, 0], exit_state.exit_depth,
                        exit_state.exit_logits)
  return cache, logits, exit_state.exit_depth, loop.step


def pad_prompts(token_lists, pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Left-aligned [B, P] int32 prompts and [B] lengths; P rounded up to `multiple` so that
  similar prompt lengths share one compiled program."""
  if not token_lists or any(len(t) == 0 for t in token_lists):
    raise ValueError('prompts must be a non-empty list of non-empty prompts')
  longest = max(len(t) for t in token_lists)
  width = -(-longest // multiple) * multiple
  prompt = np.full((len(token_lists), width), pad_id, np.int32)
  for row, ids in enumerate(token_lists):
    prompt[row, :len(ids)] = ids
  return prompt, np.asarray([len(t) for t in token_lists], np.int32)
