"""Self-speculative greedy decoding (LayerSkip): draft with the first E layers, verify at
full depth, keep the longest agreeing prefix.

One round, per row b at position p_b (the row's last generated token x_0, which has no K/V
yet, sits at p_b):

  draft   for j = 0..k: run layers 0..E-1 on x_j at position p_b + j, writing their K/V into
          the cache and saving the hidden state at depth E; for j < k the exit head at depth
          E gives the draft x_{j+1} = argmax. (Step k only completes x_k's lower layers: its
          head output would not be used.)
  verify  one pass of layers E..L-1 over the k+1 saved states at positions p_b..p_b+k,
          writing their K/V and attending causally; the final head gives v_0..v_k, v_j the
          full-depth greedy token after x_j. Layers below E are not recomputed: their K/V is
          the draft's.
  accept  a = length of the prefix with x_{j+1} == v_j; the row emits v_0..v_a (the a
          accepted drafts and the correction, or bonus when a = k) and p_b advances by a+1.

Emitted tokens are always the verifier's, and x_0..x_a, whose K/V is now in the cache at every
layer, are exactly the tokens full-depth greedy decoding would have fed, so the output equals
full-depth greedy decoding token for token. Rejected drafts need no roll-back: their cache
slots lie beyond the row's position, where the attention mask hides them until later rounds
overwrite them (a round writes a slot before any query attends to it).

Rows progress independently (each at its own position, accepting its own number of tokens);
a row that emitted EOS or max_new_tokens keeps running masked computation at a frozen
position, so shapes never depend on the data.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import costs
from adaptive_depth import layers
from adaptive_depth import model as model_lib
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.decode import kv_cache


@flax.struct.dataclass
class SpeculativeTokens(adaptive_decode.GeneratedTokens):
  """GeneratedTokens (every emitted token has exit_depth num_layers: the full-depth verifier
  chose it) plus counters for cost accounting:

  rounds: [B] rounds in which the row was still generating. Each costs num_draft draft
    heads, num_draft + 1 lower-layer passes (draft steps) and num_draft + 1 verified
    positions; see `speculative_flops`.
  accepted_drafts: [B] emitted tokens that were drafts the verifier agreed with.
  loop_rounds: [] rounds the batch ran (the longest row's rounds).
  """
  rounds: jax.Array
  accepted_drafts: jax.Array
  loop_rounds: jax.Array


def validate_args(cfg: model_lib.ModelConfig, draft_depth, num_draft) -> None:
  """Raises ValueError naming the argument and its allowed range."""
  if not isinstance(draft_depth, (int, np.integer)) or not 1 <= draft_depth < cfg.num_layers:
    raise ValueError(f'draft_depth={draft_depth!r}: must be an int in 1..{cfg.num_layers - 1} '
                     f'(num_layers - 1; the verifier runs the layers from draft_depth on)')
  if not isinstance(num_draft, (int, np.integer)) or num_draft < 1:
    raise ValueError(f'num_draft={num_draft!r}: must be an int >= 1')
  if cfg.has_exit_heads and draft_depth not in cfg.exit_depths:
    raise ValueError(f'draft_depth={draft_depth}: this model\'s early exits have heads of '
                     f'their own, so the draft must read one of them; allowed: '
                     f'{list(cfg.exit_depths[:-1])} (config.model.exit_layers)')


def draft_exit_number(cfg: model_lib.ModelConfig, draft_depth: int):
  """The exit whose head drafts at depth draft_depth: its exit number when draft_depth is
  an exit depth, else None (models without per-exit heads read every depth through the
  final norm, see model.exit_normed)."""
  return cfg.exit_depths.index(draft_depth) if draft_depth in cfg.exit_depths else None


@flax.struct.dataclass
class _RoundLoop:
  """The carry of the loop over draft-and-verify rounds: rounds run for the whole batch,
  the cache, tokens and depths so far [B, max_new + k + 1], per row whether it is done,
  tokens emitted, the last emitted token (no K/V yet), its rounds and accepted drafts."""
  loop_rounds: jax.Array
  cache: kv_cache.Cache
  tokens: jax.Array
  depths: jax.Array
  done: jax.Array
  num_generated: jax.Array
  last: jax.Array
  rounds: jax.Array
  accepted: jax.Array


def _run_layers(cfg, params, cache, h, positions, first, last):
  """Layers first..last-1 (loop steps) on h [B, T, D] at positions [B, T], each writing its
  K/V into the cache before attending (so position t sees itself and the earlier positions
  of this call). Returns (cache, h)."""
  cache_len = cache.length
  slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (h.shape[0], cache_len))
  mask = layers.causal_mask(positions, slots)  # [B, T, S]: the row's slots <= own position

  def body(step, carry):
    cache, h = carry
    h, cache = kv_cache.cached_step(cfg, params, cache, step, h, positions, mask)
    return cache, h

  return jax.lax.fori_loop(first, last, body, (cache, h))


def _draft(cfg, params, cache, last_token, position, draft_depth, num_draft):
  """Draft phase. last_token, position: [B]. Returns (cache with layers < E written at
  position..position+k, hidden states at depth E [B, k+1, D], drafts [B, k] int32)."""
  batch = last_token.shape[0]
  draft_exit = draft_exit_number(cfg, draft_depth)
  inputs = jnp.zeros((batch, num_draft + 1), jnp.int32).at[:, 0].set(last_token)
  hidden = jnp.zeros((batch, num_draft + 1, cfg.width), cfg.compute_dtype)

  def body(j, carry):
    cache, inputs, hidden = carry
    token = jax.lax.dynamic_index_in_dim(inputs, j, axis=1)  # [B, 1]
    h = model_lib.embed(cfg, params, token)
    cache, h = _run_layers(cfg, params, cache, h, (position + j)[:, None], 0, draft_depth)
    hidden = jax.lax.dynamic_update_index_in_dim(hidden, h, j, axis=1)
    # The last step only completes x_k's lower layers for the verifier: it skips the head
    # and writes x_k back onto itself.
    draft = jax.lax.cond(
        j < num_draft,
        lambda: jnp.argmax(model_lib.head_logits(cfg, params, h[:, 0], draft_exit),
                           -1).astype(jnp.int32),
        lambda: token[:, 0])
    inputs = jax.lax.dynamic_update_index_in_dim(
        inputs, draft[:, None], jnp.minimum(j + 1, num_draft), axis=1)
    return cache, inputs, hidden

  cache, inputs, hidden = jax.lax.fori_loop(0, num_draft + 1, body, (cache, inputs, hidden))
  return cache, hidden, inputs[:, 1:]


def _verify(cfg, params, cache, hidden, position, draft_depth):
  """Verify phase: layers E..L-1 over hidden [B, k+1, D] at position + 0..k.
  Returns (cache, greedy tokens [B, k+1] int32: token j is the full model's after x_j)."""
  positions = position[:, None] + jnp.arange(hidden.shape[1], dtype=jnp.int32)[None, :]
  cache, h = _run_layers(cfg, params, cache, hidden, positions, draft_depth, cfg.num_layers)
  return cache, jnp.argmax(model_lib.head_logits(cfg, params, h), -1).astype(jnp.int32)


def generate_speculative(cfg: model_lib.ModelConfig, params, prompt, prompt_lengths, *,
                         max_new_tokens: int, draft_depth: int, num_draft: int, eos_id,
                         pad_id) -> SpeculativeTokens:
  """Greedy generation by self-speculative decoding; equals full-depth greedy decoding.

  prompt: [B, P] int, left-aligned; prompt_lengths: [B] (ragged, each >= 1).
  max_new_tokens, draft_depth (E, 1..num_layers-1), num_draft (k >= 1): static under jit.
  eos_id, pad_id: ints (may be traced; eos_id = -1 never matches).
  Returns SpeculativeTokens: tokens / exit_depth [B, max_new_tokens] (pad / 0 after EOS),
  num_generated [B] (up to and including EOS), and the round counters.
  """
  validate_args(cfg, draft_depth, num_draft)
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens!r}: must be >= 1')
  batch, prompt_len = prompt.shape
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  slack = num_draft + 1  # a round writes up to position + k, one past the last emitted slot
  cache, logits = adaptive_decode.prefill(cfg, params, prompt, prompt_lengths,
                                          prompt_len + max_new_tokens + slack)
  first = jnp.argmax(logits, -1).astype(jnp.int32)
  width = max_new_tokens + slack  # room for a whole round's tokens past the end
  tokens = jnp.full((batch, width), pad_id, jnp.int32).at[:, 0].set(first)
  depths = jnp.zeros((batch, width), jnp.int32).at[:, 0].set(cfg.num_layers)
  num_generated = jnp.ones((batch,), jnp.int32)
  done = (first == eos_id) | (max_new_tokens == 1)
  zeros = jnp.zeros((batch,), jnp.int32)
  offsets = jnp.arange(num_draft + 1, dtype=jnp.int32)[None, :]  # [1, k+1]
  rows = jnp.arange(batch)[:, None]

  def body(loop: _RoundLoop) -> _RoundLoop:
    cache, tokens, depths, done = loop.cache, loop.tokens, loop.depths, loop.done
    num_generated, last = loop.num_generated, loop.last
    position = prompt_lengths + num_generated - 1  # where `last` goes; it has no K/V yet
    cache, hidden, drafts = _draft(cfg, params, cache, last, position, draft_depth, num_draft)
    cache, verified = _verify(cfg, params, cache, hidden, position, draft_depth)
    agree = jnp.cumprod((drafts == verified[:, :-1]).astype(jnp.int32), axis=1)
    accepted = agree.sum(1)  # [B]
    # Emit v_0..v_accepted, cut after the first EOS and at max_new_tokens; finished rows 0.
    count = jnp.where(done, 0, jnp.minimum(accepted + 1, max_new_tokens - num_generated))
    is_eos = (verified == eos_id) & (offsets < count[:, None])
    hit_eos = is_eos.any(1)
    count = jnp.where(hit_eos, jnp.argmax(is_eos, 1) + 1, count)
    keep = offsets < count[:, None]
    slots = num_generated[:, None] + offsets
    # Slots past `count` get pad for now; a later round of this row overwrites them.
    tokens = tokens.at[rows, slots].set(jnp.where(keep, verified, pad_id))
    depths = depths.at[rows, slots].set(jnp.where(keep, cfg.num_layers, 0))
    last = jnp.where(count > 0, jnp.take_along_axis(
        verified, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0], last)
    num_generated = num_generated + count
    return _RoundLoop(
        loop_rounds=loop.loop_rounds + 1, cache=cache, tokens=tokens, depths=depths,
        done=done | hit_eos | (num_generated >= max_new_tokens), num_generated=num_generated,
        last=last, rounds=loop.rounds + (~done).astype(jnp.int32),
        accepted=loop.accepted + jnp.minimum(accepted, count))

  loop = jax.lax.while_loop(
      lambda loop: ~jnp.all(loop.done), body,
      _RoundLoop(loop_rounds=jnp.int32(0), cache=cache, tokens=tokens, depths=depths,
                 done=done, num_generated=num_generated, last=first, rounds=zeros,
                 accepted=zeros))
  tokens, depths, num_generated = loop.tokens, loop.depths, loop.num_generated
  rounds, accepted_total, loop_rounds = loop.rounds, loop.accepted, loop.loop_rounds
  emitted = jnp.arange(max_new_tokens)[None, :] < num_generated[:, None]
  return SpeculativeTokens(
      tokens=jnp.where(emitted, tokens[:, :max_new_tokens], pad_id),
      exit_depth=jnp.where(emitted, depths[:, :max_new_tokens], 0),
      num_generated=num_generated, rounds=rounds, accepted_drafts=accepted_total,
      loop_rounds=loop_rounds)


def round_flops(cfg: model_lib.ModelConfig, num_draft: int, draft_depth: int,
                context: float) -> float:
  """FLOPs one row spends in one round at attention context `context`: k+1 positions
  through layers < E and k draft heads, then k+1 positions through layers >= E and the
  final head."""
  validate_args(cfg, draft_depth, num_draft)
  block = costs.block_flops(cfg, context)
  head = costs.head_flops(cfg)
  positions = num_draft + 1
  draft = positions * draft_depth * block + num_draft * head
  verify = positions * (cfg.num_layers - draft_depth) * block + positions * head
  return float(draft + verify)


def speculative_flops(cfg: model_lib.ModelConfig, rounds, num_draft: int, draft_depth: int,
                      tokens, context: float):
  """FLOPs per generated token relative to full-depth decoding (1.0 = no saving).

  rounds, tokens: scalars or matching arrays (e.g. SpeculativeTokens.rounds and
  num_generated per row). The first token comes from the prefill, as in plain decoding,
  and is charged one full-depth token like there; every later token is paid for by the
  rounds. Rows that finished early but still ride along in a batched loop are not charged
  (that is batching overhead, not the method's cost). Returns a float or an array.

  Every position runs every layer once and rejected drafts are wasted, so this never drops
  below 1: self-speculation buys latency where decoding is memory-bound (the layers from
  draft_depth on are read once per round for k+1 positions), not FLOPs.
  """
  full = costs.full_depth_flops(cfg, context)
  rounds = np.asarray(rounds, np.float64)
  tokens = np.asarray(tokens, np.float64)
  if np.any(tokens < 1):
    raise ValueError(f'tokens={tokens!r}: must be >= 1 (the prefill emits one)')
  spent = full + rounds * round_flops(cfg, num_draft, draft_depth, context)
  relative = spent / (tokens * full)
  return float(relative) if relative.ndim == 0 else relative
