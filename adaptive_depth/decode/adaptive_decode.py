"""The pieces of per-row early-exit decoding, and KV policy 'propagate': prefill, the exit
check of one decode step, and a decode step whose body is a masked while_loop over depth
(`generation.generate_tokens` runs the while_loop over positions around it).

KV cache: k, v [num_layers, B, cache_len, KV, Dh] (one slot per loop step, so a recursive
model caches per recursion step), with the prompt left-aligned in each row and row b's next
token written at its own position. Shapes are fixed by (batch, cache_len): one compile
serves every prompt, threshold and sampling setting.

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

@flax.struct.dataclass
class Cache:
  k: jax.Array  # [L, B, S, KV, Dh]
  v: jax.Array


@flax.struct.dataclass
class GeneratedTokens:
  """tokens: [B, max_new] (after EOS: the pad id); exit_depth: [B, max_new] (0 after EOS);
  num_generated: [B] tokens up to and including EOS."""
  tokens: jax.Array
  exit_depth: jax.Array
  num_generated: jax.Array


def write_positions(cache_layer, values, positions):
  """cache_layer: [B, S, ...]; values: [B, T, ...] written at each row's positions [B, T].
  Shared by every decode path (one token per row, a queue group, a speculative round)."""
  rows = jnp.arange(values.shape[0])[:, None]
  return cache_layer.at[rows, positions].set(values)


def layer_merge(cache, step, positions):
  """The merge_kv callback for loop step `step` (traced): writes a call's K/V [B, T, KV, Dh]
  at positions [B, T] into that step's cache layer and returns the layer to attend to."""
  k_layer = jax.lax.dynamic_index_in_dim(cache.k, step, keepdims=False)
  v_layer = jax.lax.dynamic_index_in_dim(cache.v, step, keepdims=False)
  return lambda k, v: (write_positions(k_layer, k, positions),
                       write_positions(v_layer, v, positions))


def store_kv(cache, step, k, v, positions):
  """cache with K/V [B, T, KV, Dh] written at positions [B, T] of step `step`'s layer (the
  same writes as layer_merge's, which XLA shares)."""
  k_layer, v_layer = layer_merge(cache, step, positions)(k, v)
  return Cache(k=cache.k.at[step].set(k_layer), v=cache.v.at[step].set(v_layer))


def prefill(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, cache_len: int):
  """Runs left-aligned prompts [B, P] at full depth. Returns (cache, logits [B, V] at each
  row's last prompt token)."""
  batch, prompt_len = prompt.shape
  positions = model_lib.default_positions(prompt)
  mask = layers.causal_mask(positions, positions)
  kv_shape = (cfg.num_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
  empty = Cache(k=jnp.zeros(kv_shape, cfg.compute_dtype), v=jnp.zeros(kv_shape, cfg.compute_dtype))

  def step(step, carry):
    h, cache = carry
    h, (k, v) = model_lib.apply_step(cfg, params, step, h, positions, mask)
    return h, store_kv(cache, step, k, v, positions)

  h, cache = jax.lax.fori_loop(0, cfg.num_layers, step,
                               (model_lib.embed(cfg, params, prompt), empty))
  last = h[jnp.arange(batch), prompt_lengths - 1]
  return cache, model_lib.head_logits(cfg, params, last)


def exit_check(cfg: model_lib.ModelConfig, params, policy: exits.ExitPolicy, classifier,
               depth, h, h_previous, active, exit_depth, exit_logits, row_position,
               may_exit=True):
  """The confidence check at loop depth `depth` (traced) for one token per row.

  h, h_previous: [B, 1, D]; active, exit_depth: [B]; exit_logits: [B, V]; may_exit: [B] bool
  or True (a row whose exit is refused keeps going). Depths where no row may leave (see
  depth.checks_at: not an exit, the last depth, below policy.min_depth, or anywhere under
  measure 'never' unless policy.exit_at forces the exit) pass everything through unchanged.
  Returns (active, exit_depth, exit_logits, h_previous).
  """
  _, exit_number = depth_lib._exit_lookup(cfg)

  def check(args):
    active, exit_depth, exit_logits, _ = args
    score, logits = depth_lib.exit_confidence(cfg, params, policy, h, h_previous,
                                              exit_number[depth], classifier)
    leaving = active & may_exit & depth_lib.exit_decision(policy, score[:, 0], depth,
                                                          row_position)
    if logits is None:  # a measure that reads no head: pay for it only when a row leaves
      exit_logits = jax.lax.cond(
          jnp.any(leaving),
          lambda: jnp.where(leaving[:, None], model_lib.head_logits(
              cfg, params, h[:, 0], exit_number[depth]), exit_logits),
          lambda: exit_logits)
    else:
      exit_logits = jnp.where(leaving[:, None], logits[:, 0], exit_logits)
    return active & ~leaving, jnp.where(leaving, depth, exit_depth), exit_logits, h

  # Under measure 'never' the check only opens where exit_at forces the exit, so full depth
  # computes no head or confidence (exit_at is traced: the test itself has to stay).
  return jax.lax.cond(depth_lib.checks_at(cfg, policy, depth), check, lambda args: args,
                      (active, exit_depth, exit_logits, h_previous))


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
  num_layers = cfg.num_layers
  batch, cache_len = token.shape[0], cache.k.shape[2]
  positions = position[:, None]
  mask = (jnp.arange(cache_len)[None, :] <= position[:, None])[:, None, :]  # [B, 1, S]
  h0 = model_lib.embed(cfg, params, token[:, None])

  def cond(carry):
    return (carry[0] < num_layers) & jnp.any(carry[2])

  def body(carry):
    step, h, active, exit_depth, exit_logits, h_previous, cache = carry
    h_new, (k, v) = model_lib.apply_step(cfg, params, step, h, positions, mask,
                                         layer_merge(cache, step, positions))
    # Rows that exited ran the block on their frozen state: their K/V here is propagation.
    cache = store_kv(cache, step, k, v, positions)
    h = jnp.where(active[:, None, None], h_new, h)
    active, exit_depth, exit_logits, h_previous = exit_check(
        cfg, params, policy, classifier, step + 1, h, h_previous, active, exit_depth,
        exit_logits, row_position)
    return step + 1, h, active, exit_depth, exit_logits, h_previous, cache

  init = (jnp.int32(0), h0, jnp.ones((batch,), bool), jnp.full((batch,), num_layers, jnp.int32),
          jnp.zeros((batch, cfg.vocab_size), jnp.float32), h0, cache)
  steps_run, h, _, exit_depth, exit_logits, _, cache = jax.lax.while_loop(cond, body, init)

  def propagate(carry):
    step, cache = carry
    k, v = model_lib.apply_step(cfg, params, step, h, positions, kv_only=True)
    return step + 1, store_kv(cache, step, k, v, positions)

  _, cache = jax.lax.while_loop(lambda c: c[0] < num_layers, propagate, (steps_run, cache))
  logits = final_logits(cfg, params, h[:, 0], exit_depth, exit_logits)
  return cache, logits, exit_depth, steps_run


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
