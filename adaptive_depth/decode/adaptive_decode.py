"""Generation with per-row early exit: prefill, then a while_loop over positions whose body is
a masked while_loop over depth, with the KV cache in the carry.

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
from adaptive_depth.decode import sampling as sampling_lib

KV_POLICIES = ('propagate',)


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


def _write(cache_layer, values, positions):
  """cache_layer: [B, S, ...]; values: [B, ...] written at positions [B]."""
  return cache_layer.at[jnp.arange(values.shape[0]), positions].set(values)


def prefill(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, cache_len: int):
  """Runs left-aligned prompts [B, P] at full depth. Returns (cache, logits [B, V] at each
  row's last prompt token)."""
  batch, prompt_len = prompt.shape
  positions = model_lib.default_positions(prompt)
  mask = layers.causal_mask(positions, positions)

  def step(h, one_block):
    h, (k, v) = model_lib.apply_block(cfg, one_block, h, positions, mask)
    return h, (k, v)

  h, (k, v) = jax.lax.scan(step, model_lib.embed(cfg, params, prompt),
                           model_lib.all_step_blocks(cfg, params))
  pad = [(0, 0), (0, 0), (0, cache_len - prompt_len), (0, 0), (0, 0)]
  cache = Cache(k=jnp.pad(k, pad), v=jnp.pad(v, pad))
  last = h[jnp.arange(batch), prompt_lengths - 1]
  return cache, model_lib.head_logits(cfg, params, last)


def decode_step(cfg: model_lib.ModelConfig, params, cache: Cache, token, position,
                policy: exits.ExitPolicy, row_position, classifier=None):
  """One new token per row through the adaptive depth loop.

  token, position, row_position: [B] (row_position is t of the decaying threshold).
  Returns (cache, logits [B, V], exit_depth [B], steps_run).
  """
  num_layers = cfg.num_layers
  batch, cache_len = token.shape[0], cache.k.shape[2]
  positions = position[:, None]
  mask = (jnp.arange(cache_len)[None, :] <= position[:, None])[:, None, :]  # [B, 1, S]
  is_exit, exit_number = depth_lib._exit_lookup(cfg)
  h0 = model_lib.embed(cfg, params, token[:, None])

  def cond(carry):
    return (carry[0] < num_layers) & jnp.any(carry[2])

  def body(carry):
    step, h, active, exit_depth, exit_logits, h_previous, cache = carry
    block = model_lib.step_block(cfg, params, step)
    k_layer = jax.lax.dynamic_index_in_dim(cache.k, step, keepdims=False)
    v_layer = jax.lax.dynamic_index_in_dim(cache.v, step, keepdims=False)
    merge = lambda k, v: (_write(k_layer, k[:, 0], position), _write(v_layer, v[:, 0], position))
    h_new, (k, v) = model_lib.apply_block(cfg, block, h, positions, mask, merge)
    # Rows that exited ran the block on their frozen state: their K/V here is propagation.
    cache = Cache(k=cache.k.at[step].set(_write(k_layer, k[:, 0], position)),
                  v=cache.v.at[step].set(_write(v_layer, v[:, 0], position)))
    h = jnp.where(active[:, None, None], h_new, h)
    depth = step + 1

    def check(args):
      h, active, exit_depth, exit_logits, h_previous = args
      score, logits = depth_lib.exit_confidence(cfg, params, policy, h, h_previous,
                                                exit_number[depth], classifier)
      if logits is None:
        logits = model_lib.head_logits(cfg, params, h)
      leaving = active & depth_lib.exit_decision(policy, score[:, 0], depth, row_position)
      exit_logits = jnp.where(leaving[:, None], logits[:, 0], exit_logits)
      return h, active & ~leaving, jnp.where(leaving, depth, exit_depth), exit_logits, h

    h, active, exit_depth, exit_logits, h_previous = jax.lax.cond(
        is_exit[depth] & (depth < num_layers) & (depth >= jnp.asarray(policy.min_depth)),
        check, lambda args: args,
        (h, active, exit_depth, exit_logits, h_previous))
    return step + 1, h, active, exit_depth, exit_logits, h_previous, cache

  init = (jnp.int32(0), h0, jnp.ones((batch,), bool), jnp.full((batch,), num_layers, jnp.int32),
          jnp.zeros((batch, cfg.vocab_size), jnp.float32), h0, cache)
  steps_run, h, _, exit_depth, exit_logits, _, cache = jax.lax.while_loop(cond, body, init)

  def propagate(carry):
    step, cache = carry
    block = model_lib.step_block(cfg, params, step)
    k, v = cfg.block.apply({'params': block}, h, positions, method=layers.Block.kv_only)
    k_layer = jax.lax.dynamic_index_in_dim(cache.k, step, keepdims=False)
    v_layer = jax.lax.dynamic_index_in_dim(cache.v, step, keepdims=False)
    return step + 1, Cache(k=cache.k.at[step].set(_write(k_layer, k[:, 0], position)),
                           v=cache.v.at[step].set(_write(v_layer, v[:, 0], position)))

  _, cache = jax.lax.while_loop(lambda c: c[0] < num_layers, propagate, (steps_run, cache))
  logits = jax.lax.cond(jnp.any(exit_depth == num_layers),
                        lambda: model_lib.head_logits(cfg, params, h[:, 0]),
                        lambda: exit_logits)
  logits = jnp.where((exit_depth < num_layers)[:, None], exit_logits, logits)
  return cache, logits, exit_depth, steps_run


def generate_tokens(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, *,
                    max_new_tokens: int, policy: exits.ExitPolicy, sampling, rng, eos_id: int,
                    pad_id: int, classifier=None) -> GeneratedTokens:
  """prompt: [B, P] left-aligned, prompt_lengths: [B]. The first new token comes from the
  prefill at full depth; every later one from the adaptive decode step. Jit with
  max_new_tokens static (the cache length is P + max_new_tokens)."""
  batch = prompt.shape[0]
  cache, logits = prefill(cfg, params, prompt, prompt_lengths,
                          prompt.shape[1] + max_new_tokens)
  rng, first_rng = jax.random.split(rng)
  first = sampling_lib.next_token(logits, sampling, first_rng)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  depths = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(cfg.num_layers)
  done = first == eos_id

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tokens, depths, cache, done, rng = carry
    rng, step_rng = jax.random.split(rng)
    previous = tokens[:, i - 1]
    cache, logits, exit_depth, _ = decode_step(
        cfg, params, cache, previous, prompt_lengths + i - 1, policy,
        jnp.full((batch,), i - 1), classifier)
    new = jnp.where(done, pad_id, sampling_lib.next_token(logits, sampling, step_rng))
    tokens = tokens.at[:, i].set(new)
    depths = depths.at[:, i].set(jnp.where(done, 0, exit_depth))
    return i + 1, tokens, depths, cache, done | (new == eos_id), rng

  _, tokens, depths, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), tokens, depths, cache, done, rng))
  is_eos = tokens == eos_id
  first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
  return GeneratedTokens(tokens=tokens, exit_depth=depths, num_generated=first_eos)


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
