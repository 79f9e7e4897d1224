"""Adaptive depth: the masked `lax.while_loop` in which each token stops at its own depth.

The loop carries the residual stream h [B, T, D], a per-token `active` mask, exit depths and
confidences. Every step runs the scheduled block on all positions and keeps
h = where(active, h_new, h): a token that exited keeps its state frozen, and deeper layers
that still attend to it read K/V computed from that frozen state (CALM's state propagation).
Shapes never depend on the data, so one compiled program serves every exit pattern and
threshold; the loop stops as soon as no token is active.

Rows never interact: a row's exits and logits depend only on that row (attention is within a
row; the early stop only skips steps in which no row had an active token).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import exit_heads
from adaptive_depth import exits
from adaptive_depth import layers
from adaptive_depth import model as model_lib


@flax.struct.dataclass
class AdaptiveOutput:
  """logits: [B, T, V] at each token's exit; exit_depth: [B, T] int32 in 1..num_layers;
  confidence: [B, T] the score that made the token exit (the last score seen if it never
  exited); steps_run: scalar int32, loop steps executed for the whole batch."""
  logits: jax.Array
  exit_depth: jax.Array
  confidence: jax.Array
  steps_run: jax.Array


def _exit_lookup(cfg: model_lib.ModelConfig):
  """([num_layers + 1] bool 'depth d is an exit', [num_layers + 1] int exit number)."""
  is_exit = np.zeros(cfg.num_layers + 1, bool)
  number = np.zeros(cfg.num_layers + 1, np.int32)
  for i, d in enumerate(cfg.exit_depths):
    is_exit[d], number[d] = True, i
  return jnp.asarray(is_exit), jnp.asarray(number)


def exit_confidence(cfg, params, policy: exits.ExitPolicy, h, h_previous, exit_number,
                    classifier=None, oracle_tokens=None):
  """Confidence [B, T] at one exit, and the exit's logits [B, T, V] (or None when the
  measure does not need them: saturation reads only hidden states)."""
  measure = policy.measure
  if measure == 'saturation':
    return exits.saturation(h, h_previous), None
  logits = model_lib.head_logits(cfg, params, h, exit_number)
  if measure in ('softmax_diff', 'softmax_diff_approx'):
    score = exits.softmax_diff(logits, approx=measure == 'softmax_diff_approx')
  elif measure == 'max_prob':
    score = exits.max_prob(logits)
  elif measure == 'neg_entropy':
    score = exits.neg_entropy(logits)
  elif measure == 'classifier':
    if classifier is None:
      raise ValueError("ExitPolicy.measure='classifier' needs classifier parameters "
                       '(train them with configs/exit_classifier.py)')
    normed = exit_heads.exit_normed(cfg, params, h, exit_number)
    features = exits.classifier_features(logits, normed, exit_number, len(cfg.exit_depths))
    score = exits.classifier_confidence(classifier, features)
  elif measure == 'oracle':
    if oracle_tokens is None:
      raise ValueError("ExitPolicy.measure='oracle' needs oracle_tokens (the full model's "
                       'argmax per position)')
    score = (jnp.argmax(logits, axis=-1) == oracle_tokens).astype(jnp.float32)
  elif measure == 'never':
    score = jnp.zeros(h.shape[:-1], jnp.float32)
  else:
    allowed = [m for m in exits.MEASURES if m != 'router']  # router: MoR decoding only
    raise ValueError(f'ExitPolicy.measure={measure!r}; allowed here: {", ".join(allowed)}')
  return score, logits


def checks_at(cfg: model_lib.ModelConfig, policy: exits.ExitPolicy, depth):
  """Whether some token may leave at loop depth `depth` (traced), so that the exit check has
  to run there: a scalar bool for one depth, [B] for one depth per row (the engine; exit_at
  is then one value for every row).

  Only exits below the last qualify (every token still active leaves at the last anyway).
  A token with exit_at > 0 leaves at the first exit from exit_at on, whatever the measure
  and min_depth; the others by confidence from min_depth on, which under measure 'never'
  is never. exit_at is traced, so it cannot decide statically whether a program has checks:
  with measure 'never' and exit_at 0 this scalar is false at every depth and the check's
  lax.cond skips all head and confidence work (full depth pays one scalar test per exit).
  """
  is_exit, _ = _exit_lookup(cfg)
  exit_at = jnp.asarray(policy.exit_at)  # scalar, or one per token
  may_leave = jnp.any((exit_at > 0) & (depth >= exit_at))
  if policy.measure != 'never':
    may_leave |= jnp.any(exit_at <= 0) & (depth >= jnp.asarray(policy.min_depth))
  return is_exit[depth] & (depth < cfg.num_layers) & may_leave


def exit_decision(policy: exits.ExitPolicy, score, depth, row_positions):
  """[B, T] bool: the tokens whose score clears the threshold at this depth."""
  if policy.measure == 'never':
    wants = jnp.zeros(score.shape, bool)
  elif policy.measure == 'oracle':
    wants = score >= 0.5
  else:
    wants = score >= exits.threshold_at(policy, row_positions)
  wants = wants & (depth >= jnp.asarray(policy.min_depth))
  exit_at = jnp.asarray(policy.exit_at)
  forced = (exit_at > 0) & (depth >= exit_at)
  return jnp.where(exit_at > 0, forced, wants)


@flax.struct.dataclass
class _ScoringLoop:
  """The carry of forward_adaptive's depth loop, per token [B, T]: state h [B, T, D], still
  active, exit depth, the last confidence seen, and the state at the previous check."""
  step: jax.Array
  h: jax.Array
  active: jax.Array
  exit_depth: jax.Array
  confidence: jax.Array
  h_previous: jax.Array


def forward_adaptive(cfg: model_lib.ModelConfig, params, tokens, policy: exits.ExitPolicy,
                     *, classifier: Optional[Any] = None, oracle_tokens=None,
                     positions=None, row_positions=None) -> AdaptiveOutput:
  """Scores `tokens` [B, T] with per-token early exit.

  positions: [B, T] RoPE positions (default 0..T-1); attention is causal in token order
  either way. row_positions: [B, T] the t of the
  decaying threshold (default: positions). oracle_tokens: [B, T] the full model's argmax,
  for policy.measure == 'oracle'. classifier: exit classifier parameters.
  """
  if cfg.routing is not None:
    raise ValueError('forward_adaptive scores early exits; this is a Mixture-of-Recursions '
                     f'model (routing {cfg.routing.routing!r}): its causal forward is '
                     'adaptive_depth.mor.forward_masked, its decoding ad.generate')
  policy = policy.validated(cfg.exit_depths)
  index = model_lib.default_positions(tokens)
  positions = index if positions is None else positions
  row_positions = positions if row_positions is None else row_positions
  # Causal in token order whatever the RoPE positions: a block attending to its own tokens
  # relies on no query seeing a later token (attention.py).
  mask = layers.causal_mask(index, index)
  _, exit_number = _exit_lookup(cfg)
  num_layers = cfg.num_layers
  h0 = model_lib.embed(cfg, params, tokens)
  batch_shape = tokens.shape

  def body(loop: _ScoringLoop) -> _ScoringLoop:
    h_new, _ = model_lib.apply_step(cfg, params, loop.step, loop.h, positions, mask)
    h = jnp.where(loop.active[..., None], h_new, loop.h)
    depth = loop.step + 1

    def check(loop):
      score, _ = exit_confidence(cfg, params, policy, loop.h, loop.h_previous,
                                 exit_number[depth], classifier, oracle_tokens)
      leaving = loop.active & exit_decision(policy, score, depth, row_positions)
      return loop.replace(active=loop.active & ~leaving,
                          exit_depth=jnp.where(leaving, depth, loop.exit_depth),
                          confidence=jnp.where(loop.active, score, loop.confidence),
                          h_previous=loop.h)

    # Checks run only where some token may leave (checks_at): not at the last depth, where
    # every token still active exits anyway, nor below min_depth (costs.token_flops charges
    # neither). Saturation therefore compares with the state at the previous check (the
    # embedding at the first one).
    loop = jax.lax.cond(checks_at(cfg, policy, depth), check, lambda loop: loop,
                        loop.replace(h=h))
    return loop.replace(step=depth)

  loop = jax.lax.while_loop(
      lambda loop: (loop.step < num_layers) & jnp.any(loop.active), body,
      _ScoringLoop(step=jnp.int32(0), h=h0, active=jnp.ones(batch_shape, bool),
                   exit_depth=jnp.full(batch_shape, num_layers, jnp.int32),
                   confidence=jnp.zeros(batch_shape, jnp.float32), h_previous=h0))
  steps_run, h, exit_depth, confidence = loop.step, loop.h, loop.exit_depth, loop.confidence
  # Each token's logits come from the head of the exit it left at (h is frozen there).
  logits = model_lib.head_logits(cfg, params, h, exit_number[exit_depth])
  return AdaptiveOutput(logits=logits, exit_depth=exit_depth, confidence=confidence,
                        steps_run=steps_run)
