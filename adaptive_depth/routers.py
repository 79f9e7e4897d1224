"""Mixture-of-Recursions routers: which tokens run each recursion, and how much of it.

A MoR model (arXiv 2507.10524) is a `middle_cycle` recursive core: a unique first layer, N_r
recursions of the same K = num_blocks - 2 shared blocks, a unique last layer. A router
decides, per token, whether a recursion runs for it:

- expert_choice: before recursion r, router r scores every token that ran recursion r - 1,
  and each row keeps the top k_r of them (capacity k_r = ceil(T * capacities[r]), a
  non-increasing schedule). An auxiliary BCE loss teaches the router logit to say on its own
  whether a token is in the top k (sigmoid > 0.5), which is what decoding decides on, one
  token at a time, without seeing the future.
- token_choice: one router before recursion 1 gives every token a depth 1..N_r (top-1 of a
  softmax). Recursion r holds at most ceil(capacity_factor * T * (N_r - r + 1) / N_r)
  tokens per row (static shapes); the tokens past it are dropped (they stop there) and
  counted. A balancing loss and a z-loss keep the assignment spread out and the logits small.

The gate. A token that runs recursion r updates its state as

    h <- h + g * (R(h) - h),        g = alpha * sigmoid(logit_r)    (expert_choice)
                                    g = alpha * softmax(logits)[depth]  (token_choice)

where R is the recursion (the K shared blocks in turn): g scales the recursion's residual
update, which is what puts the router on the LM loss's gradient path. gate='pass_through'
fixes g = 1 (the recursion's output as it is). Tokens that skip keep h.

Router parameters, params['routers']: 'linear': {'kernel': [N_r, D]} (expert_choice) or
{'kernel': [D, N_r]} (token_choice); 'mlp' adds a hidden layer of router_hidden units
({'hidden': [N_r, D, H] or [D, H], 'kernel': [N_r, H] or [H, N_r]}). Routers read the
residual state in float32.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

# The static description lives in mor_config.py (config.model.mor); re-exported here.
from adaptive_depth.mor_config import (  # pylint: disable=unused-import,g-bad-import-order
    GATES, KV_KINDS, ROUTER_KINDS, ROUTINGS, RoutingConfig, default_capacities,
    parse_capacities)


def init_boxed(routing: RoutingConfig, width: int, rng, init_std: float = 0.02) -> dict:
  """Boxed router parameters (layout in the module docstring)."""
  n, hidden = routing.recursions, routing.router_hidden
  k_hidden, k_out = jax.random.split(rng)
  normal = lambda key, shape: init_std * jax.random.normal(key, shape, jnp.float32)
  per_recursion = routing.routing == 'expert_choice'
  if routing.router == 'linear':
    if per_recursion:
      return {'kernel': nn.LogicallyPartitioned(normal(k_out, (n, width)),
                                                ('recursions', 'embed'))}
    return {'kernel': nn.LogicallyPartitioned(normal(k_out, (width, n)),
                                              ('embed', 'recursions'))}
  if per_recursion:
    return {'hidden': nn.LogicallyPartitioned(normal(k_hidden, (n, width, hidden)),
                                              ('recursions', 'embed', 'router_hidden')),
            'kernel': nn.LogicallyPartitioned(normal(k_out, (n, hidden)),
                                              ('recursions', 'router_hidden'))}
  return {'hidden': nn.LogicallyPartitioned(normal(k_hidden, (width, hidden)),
                                            ('embed', 'router_hidden')),
          'kernel': nn.LogicallyPartitioned(normal(k_out, (hidden, n)),
                                            ('router_hidden', 'recursions'))}


def router_logits(routing: RoutingConfig, router_params, h, recursion=None):
  """expert_choice: router `recursion`'s logit per token, h [..., D] -> [...] (recursion a
  scalar, or an int array of h.shape[:-1]: each token's own recursion, as the engine's
  slots have); token_choice: the depth logits, h [..., D] -> [..., N_r]. float32."""
  x = h.astype(jnp.float32)
  p = router_params
  if routing.routing == 'expert_choice':
    recursion = jnp.asarray(recursion)
    if 'hidden' in p:
      x = jax.nn.gelu(jnp.einsum('...d,...dh->...h', x, p['hidden'][recursion]))
    return jnp.einsum('...d,...d->...', x, p['kernel'][recursion])
  if 'hidden' in p:
    x = jax.nn.gelu(x @ p['hidden'])
  return x @ p['kernel']


def gated_update(h, out, gate, runs=None):
  """The state after a recursion (module docstring): h + g (out - h) where the token ran
  it (runs, default everywhere), h elsewhere. h, out: [..., D]; gate, runs: [...]."""
  updated = h + gate[..., None].astype(h.dtype) * (out - h)
  return updated if runs is None else jnp.where(runs[..., None], updated, h)


def every_recursion(routing: RoutingConfig, shape):
  """forced_depth making every token run every recursion (the full-compute baseline)."""
  return jnp.full(shape, routing.recursions, jnp.int32)


def always_runs(routing: RoutingConfig):
  """[N_r] bool: recursions trained at capacity 1 (top-k kept every token), which decoding
  runs for every token that reached them."""
  return jnp.asarray(np.asarray(routing.capacities) >= 1.0)


def expert_choice_gate(routing: RoutingConfig, logits):
  """g per token from its router logit (module docstring): [...] -> [...]."""
  if routing.gate == 'pass_through':
    return jnp.ones_like(logits)
  return routing.alpha * jax.nn.sigmoid(logits)


def token_choice_depth(routing: RoutingConfig, logits):
  """(depth [...] int32 in 1..N_r, gate [...]) from depth logits [..., N_r]."""
  choice = jnp.argmax(logits, axis=-1)
  gate = jax.nn.softmax(logits, axis=-1).max(axis=-1)  # the chosen depth's probability
  if routing.gate == 'pass_through':
    gate = jnp.ones_like(gate)
  else:
    gate = routing.alpha * gate
  return (choice + 1).astype(jnp.int32), gate


def top_k_positions(scores, eligible, k: int):
  """Per row, the k highest-scoring eligible tokens, in position order.

  scores, eligible: [B, T]; k static. Returns (index [B, k] int32 ascending, valid [B, k]
  bool: the slot holds an eligible token; false only when a row has fewer than k).
  Ascending order keeps the gathered sequence causal in index order (what splash assumes).
  """
  masked = jnp.where(eligible, scores, -jnp.inf)
  top, index = jax.lax.top_k(masked, k)
  valid = top > -jnp.inf
  # Invalid slots sort last (index T), so valid ones stay in position order at the front.
  order = jnp.argsort(jnp.where(valid, index, scores.shape[1]), axis=-1)
  index = jnp.take_along_axis(index, order, axis=-1).astype(jnp.int32)
  return index, jnp.take_along_axis(valid, order, axis=-1)


def membership_bce(logits, selected, eligible):
  """Mean binary cross entropy of router logits against top-k membership over the eligible
  tokens. logits: [B, T]; selected, eligible: [B, T] bool -> scalar."""
  loss = optax.sigmoid_binary_cross_entropy(logits, selected.astype(jnp.float32))
  weight = eligible.astype(jnp.float32)
  return jnp.sum(loss * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def balance_terms(logits):
  """Token-choice losses and load from depth logits [B, T, N_r]: (balance loss
  N_r * sum_i f_i P_i (f: share of tokens whose argmax is i, P: mean probability of i),
  z-loss mean(logsumexp^2), max_violation (max_i load_i - mean load) / mean load)."""
  n = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  share = jax.nn.one_hot(jnp.argmax(logits, axis=-1), n).mean(axis=(0, 1))
  balance = n * jnp.sum(share * probs.mean(axis=(0, 1)))
  z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
  max_violation = (jnp.max(share) - 1.0 / n) * n
  return balance, z, max_violation


@flax.struct.dataclass
class RoutingOutput:
  """What a MoR forward tells the losses and the logs. Per recursion r (leading [N_r]):
  selected [N_r, B, T] bool (ran recursion r), logits (expert_choice: [N_r, B, T] router r's
  logit; token_choice: [B, T, N_r] depth logits), dropped [N_r] share of tokens that asked
  for recursion r and did not get it (token_choice; zeros otherwise); aux_loss: the weighted
  router losses to add to the LM loss; metrics: scalars for the logs."""
  selected: jax.Array
  logits: jax.Array
  dropped: jax.Array
  aux_loss: jax.Array
  metrics: dict



def causal_decisions(routing: RoutingConfig, out: RoutingOutput):
  """[N_r, B, T] bool: whether decoding, one token at a time, would run each recursion for
  each token, from the same router logits (as route decides, at threshold 0.5):
  expert_choice sigmoid(logit) > 0.5 (logit > 0), or always where the recursion's capacity
  is 1; token_choice recursion r while r < the argmax depth."""
  if routing.routing == 'expert_choice':
    return always_runs(routing)[:, None, None] | (out.logits > 0)
  depth = jnp.argmax(out.logits, axis=-1) + 1
  return jnp.stack([depth > r for r in range(routing.recursions)])


def decision_agreement_sums(routing: RoutingConfig, out: RoutingOutput):
  """How often the causal decision matches the training-time selection, per recursion, over
  the tokens that ran the previous recursion in training: ([N_r] agreeing, [N_r] counted)."""
  selected = out.selected
  eligible = jnp.concatenate([jnp.ones_like(selected[:1]), selected[:-1]])
  agree = (causal_decisions(routing, out) == selected) & eligible
  return agree.sum(axis=(1, 2)).astype(jnp.float32), eligible.sum(axis=(1, 2)).astype(
      jnp.float32)


@flax.struct.dataclass
class RouteState:
  """Per token [...], the causal routing so far: running (ran every recursion up to now),
  ran (recursions run), and for token_choice the depth and gate its router chose at the
  first recursion."""
  running: jax.Array
  ran: jax.Array
  chosen_depth: jax.Array
  chosen_gate: jax.Array

  @classmethod
  def start(cls, shape, recursions: int) -> 'RouteState':
    """Tokens of `shape` before their first recursion."""
    return cls(running=jnp.ones(shape, bool), ran=jnp.zeros(shape, jnp.int32),
               chosen_depth=jnp.full(shape, recursions, jnp.int32),
               chosen_gate=jnp.ones(shape, jnp.float32))


def route(routing: RoutingConfig, router_params, h, recursion, state: RouteState, threshold,
          forced_depth=None):
  """The causal decision, token by token, whether recursion `recursion` (static or traced)
  runs: what decoding decides with, and the masked full-sequence forward too.

  expert_choice: a token that ran the previous recursion runs this one when
  sigmoid(router logit) > threshold, or always where the recursion's training capacity is
  1 (top-k of every token kept them all). token_choice: while recursion < the depth its
  router chose at recursion 0. forced_depth: [...] recursions to run instead (the gate is
  still the router's). h: [..., D]; threshold: scalar (traced).
  Returns (runs [...] bool, gate [...] float32, the new RouteState).
  """
  recursion = jnp.asarray(recursion)
  if routing.routing == 'expert_choice':
    logits = router_logits(routing, router_params, h, recursion)
    gate = expert_choice_gate(routing, logits)
    wants = always_runs(routing)[recursion] | (jax.nn.sigmoid(logits) > threshold)
  else:
    depth, first_gate = token_choice_depth(routing, router_logits(routing, router_params, h))
    chosen_depth = jnp.where(recursion == 0, depth, state.chosen_depth)
    chosen_gate = jnp.where(recursion == 0, first_gate, state.chosen_gate)
    state = state.replace(chosen_depth=chosen_depth, chosen_gate=chosen_gate)
    gate, wants = chosen_gate, recursion < chosen_depth
  if forced_depth is not None:
    wants = recursion < forced_depth
  runs = state.running & wants
  return runs, gate, state.replace(running=runs, ran=state.ran + runs)
