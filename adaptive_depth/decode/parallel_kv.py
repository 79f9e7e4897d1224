"""KV policy 'parallel' (FREE's synchronised parallel decoding), generalised to many exits.

A token that exits at depth e leaves its later layers' K/V unwritten and joins its row's
queue with its state at depth e. Whenever a later token of that row runs layer j, every
queued token that has not yet run layer j runs it in the same block call (the queue and the
current token form one short sequence, in position order), so each layer's K/V for every
earlier position is exact before anything attends to it. The cache therefore always equals a
full-depth pass over the emitted tokens, up to layers not yet needed. A token that goes to
the last layer empties its row's queue; a full queue refuses the exit, forcing that pass.

At batch 1 the catch-up costs little wall time: the queue rides along in block calls that
read the same weights (decode is bound by weight reads, not arithmetic).

Shapes: queue h [B, Q, D], position / reached [B, Q], count [B]; the group of one decode
step is the queue plus the current token, [B, G = Q + 1]. Writes of slots that do not take
part in a layer go to the cache's last slot, which no query ever attends to (the cache is
allocated one position longer than any token needs).
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
from adaptive_depth.decode import kv_cache


@flax.struct.dataclass
class ExitQueue:
  """Tokens per row whose deeper layers have not run yet, in position order."""
  h: jax.Array         # [B, Q, D] residual state at depth `reached`
  position: jax.Array  # [B, Q]
  reached: jax.Array   # [B, Q] layers run so far
  count: jax.Array     # [B] valid entries (the first `count` slots)
  # The adaptive threshold's record of each queued token's exit checks ([B, Q, E]; None
  # otherwise), labelled once the token reaches the last layer.
  checks: Any = None
  check_scores: Any = None
  check_argmax: Any = None

  @classmethod
  def empty(cls, batch: int, capacity: int, width: int, dtype,
            num_exits: int = 0) -> 'ExitQueue':
    """num_exits > 0: with the record of exit checks (adaptive threshold)."""
    record = lambda dtype: (jnp.zeros((batch, capacity, num_exits), dtype) if num_exits
                            else None)
    return cls(h=jnp.zeros((batch, capacity, width), dtype),
               position=jnp.zeros((batch, capacity), jnp.int32),
               reached=jnp.zeros((batch, capacity), jnp.int32),
               count=jnp.zeros((batch,), jnp.int32), checks=record(bool),
               check_scores=record(jnp.float32), check_argmax=record(jnp.int32))

  @property
  def capacity(self) -> int:
    return self.h.shape[1]

  def valid(self):
    return jnp.arange(self.capacity)[None, :] < self.count[:, None]


@flax.struct.dataclass
class _CatchUpLoop:
  """The depth loop's carry: the group's states h [B, G, D] and layers reached [B, G], the
  current token's exits, and the cache."""
  step: jax.Array
  h: jax.Array
  reached: jax.Array
  exits: decode_lib.ExitState
  cache: kv_cache.Cache


def _run_layer(cfg, params, cache, step, h, positions, takes_part):
  """Layer `step` for the slots that take part. h: [B, G, D]; positions: [B, G];
  takes_part: [B, G]. Returns (h, cache) with only those slots' states and K/V changed."""
  scratch = cache.length - 1
  write_at = jnp.where(takes_part, positions, scratch)
  mask = jnp.arange(cache.length)[None, None, :] <= positions[:, :, None]  # [B, G, S]
  h_new, cache = kv_cache.cached_step(cfg, params, cache, step, h, write_at, mask)
  return jnp.where(takes_part[:, :, None], h_new, h), cache


def decode_step(cfg: model_lib.ModelConfig, params, cache, queue: ExitQueue, token, position,
                policy: exits.ExitPolicy, row_position, classifier=None):
  """One new token per row with the queued tokens catching up alongside it.

  token, position, row_position: [B]. Returns (cache, queue, logits [B, V], exit_depth [B],
  observations): the adaptive threshold's labelled exit checks when the queue keeps their
  record (adaptive_threshold.Observations, [B, E + Q * E]), else None.
  """
  num_layers, capacity = cfg.num_layers, queue.capacity
  batch = token.shape[0]
  h = jnp.concatenate([queue.h, model_lib.embed(cfg, params, token[:, None])], axis=1)
  positions = jnp.concatenate([queue.position, position[:, None]], axis=1)
  reached = jnp.concatenate([queue.reached, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  valid = jnp.concatenate([queue.valid(), jnp.ones((batch, 1), bool)], axis=1)
  may_exit = queue.count < capacity

  def body(loop: _CatchUpLoop) -> _CatchUpLoop:
    takes_part = valid & (loop.reached <= loop.step) & loop.exits.active[:, None]
    h, cache = _run_layer(cfg, params, loop.cache, loop.step, loop.h, positions, takes_part)
    exit_state = decode_lib.exit_check(cfg, params, policy, classifier, loop.step + 1,
                                       h[:, capacity:], loop.exits, row_position, may_exit)
    return _CatchUpLoop(step=loop.step + 1, h=h,
                        reached=jnp.where(takes_part, loop.step + 1, loop.reached),
                        exits=exit_state, cache=cache)

  loop = jax.lax.while_loop(
      lambda loop: (loop.step < num_layers) & jnp.any(loop.exits.active), body,
      _CatchUpLoop(step=jnp.int32(0), h=h, reached=reached,
                   exits=decode_lib.ExitState.start(cfg, h[:, capacity:],
                                                    record=queue.checks is not None),
                   cache=cache))
  h, reached, cache = loop.h, loop.reached, loop.cache
  exit_depth, exit_logits = loop.exits.exit_depth, loop.exits.exit_logits

  exited = exit_depth < num_layers
  rows = jnp.arange(batch)
  slot = jnp.minimum(queue.count, capacity - 1)  # only used where the row exited (count < Q)
  new_h = h[:, :capacity].at[rows, slot].set(
      jnp.where(exited[:, None], h[:, capacity], h[rows, slot]))
  new_position = queue.position.at[rows, slot].set(
      jnp.where(exited, position, queue.position[rows, slot]))
  new_reached = reached[:, :capacity].at[rows, slot].set(
      jnp.where(exited, exit_depth, reached[rows, slot]))
  logits = decode_lib.final_logits(cfg, params, h[:, capacity], exit_depth, exit_logits)
  observations, record = None, {}
  if queue.checks is not None:
    observations = _label_checks(cfg, params, queue, loop.exits, logits, h[:, :capacity])
    keep = lambda old, new: old.at[rows, slot].set(
        jnp.where(exited[:, None], new, old[rows, slot]))
    record = {name: keep(getattr(queue, name), getattr(loop.exits, name))
              for name in ('checks', 'check_scores', 'check_argmax')}
  # A token that went all the way took every queued token of its row along: the queue empties.
  queue = queue.replace(h=new_h, position=new_position, reached=new_reached,
                        count=jnp.where(exited, queue.count + 1, 0), **record)
  return cache, queue, logits, exit_depth, observations


def _label_checks(cfg, params, queue: ExitQueue, checked: decode_lib.ExitState, logits,
                  queued_h):
  """The exit checks whose full-depth prediction is known after this step: the current
  token's, where it went all the way (logits are then the last exit's), and those of every
  token queued in such a row (queued_h [B, Q, D] is then their last-layer state)."""
  deep = checked.exit_depth == cfg.num_layers  # [B]
  final = jnp.argmax(logits, -1)  # [B]
  caught_up = queue.valid() & deep[:, None]  # [B, Q]
  queued_final = jax.lax.cond(
      jnp.any(caught_up),
      lambda: jnp.argmax(model_lib.head_logits(cfg, params, queued_h), -1).astype(jnp.int32),
      lambda: jnp.zeros(queue.position.shape, jnp.int32))
  batch = deep.shape[0]
  flat = lambda x: x.reshape(batch, -1)
  return adaptive_threshold.Observations(
      confidence=jnp.concatenate([checked.check_scores, flat(queue.check_scores)], -1),
      agreed=jnp.concatenate([checked.check_argmax == final[:, None],
                              flat(queue.check_argmax == queued_final[..., None])], -1),
      observed=jnp.concatenate([checked.checks & deep[:, None],
                                flat(queue.checks & caught_up[..., None])], -1))


def flush(cfg: model_lib.ModelConfig, params, cache, queue: ExitQueue):
  """Runs every queued token through its remaining layers (so the cache is complete, e.g.
  before the sequence is extended later). Returns (cache, empty queue)."""
  valid = queue.valid()
  start = jnp.min(jnp.where(valid, queue.reached, cfg.num_layers))

  def body(carry):
    step, h, cache = carry
    h, cache = _run_layer(cfg, params, cache, step, h, queue.position,
                          valid & (queue.reached <= step))
    return step + 1, h, cache

  _, _, cache = jax.lax.while_loop(lambda c: c[0] < cfg.num_layers, body,
                                   (start, queue.h, cache))
  return cache, queue.replace(count=jnp.zeros_like(queue.count))
