"""The Mixture-of-Recursions forward in train mode: routed tokens only run each recursion.

The model is a `middle_cycle` recursive core (model.py) with params['routers']
(routers.py): step 0 is the unique first layer, steps 1 + r*K .. (r+1)*K run recursion r
(0-based) through the K shared blocks, and the last step is the unique last layer. Every
token runs the first and last layers; recursion r runs only on the tokens its router keeps.

Gather, run, scatter. Each row's kept tokens (a static count k_r) are gathered into
[B, k_r, D] in position order, the recursion's K blocks run on them alone with RoPE at
their original positions and a causal mask over those positions, and the gated results are
scattered back into [B, T, D]: FLOPs really drop with k_r, and shapes never depend on the
data. The recursions are unrolled (N_r is small and every k_r differs, which a scan could
not carry).

KV. 'recursion_wise': in recursion r a token attends only to the tokens that run r.
'shared': recursion 0 runs every token (its capacity must be 1) and each of its K layers'
K/V is kept; in later recursions the same layer attends to those K/V of every earlier
token (causal) and computes none of its own.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from adaptive_depth import layers
from adaptive_depth import model as model_lib
from adaptive_depth import routers


def recursion_steps(cfg: model_lib.ModelConfig, recursion: int) -> range:
  """The loop steps recursion `recursion` (0-based) runs."""
  per = cfg.num_blocks - 2
  return range(1 + recursion * per, 1 + (recursion + 1) * per)


def _gather(x, index):
  """x: [B, T, ...], index: [B, k] -> [B, k, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter(x, index, values):
  """x with x[b, index[b, i]] = values[b, i]. x: [B, T, ...]; values: [B, k, ...]."""
  rows = jnp.arange(x.shape[0])[:, None]
  return x.at[rows, index].set(values)


def _block_cfg(cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
  # A gathered sequence may hold invalid slots (token_choice rows with fewer eligible
  # tokens than the capacity), masked out of attention: splash applies only its own
  # index-causal mask, so those calls take heads_major (the same function).
  if cfg.attention == 'splash':
    return dataclasses.replace(cfg, attention='heads_major')
  return cfg


def _run_recursion(cfg, per_step, recursion, h, positions, valid, shared_kv):
  """The K blocks of one recursion on gathered tokens.

  h: [B, k, D]; positions, valid: [B, k]. shared_kv: None (attend among these tokens) or
  (per layer (k, v) of recursion 0 in the cache layout (layers.to_cache_layout), key
  positions [B, T]) to attend to instead. Returns (h [B, k, D], per layer own (k, v)
  [B, k, KV, Dh]).
  """
  if shared_kv is None:
    mask = layers.causal_mask(positions, positions) & valid[:, None, :]
  else:
    layer_kv, key_positions = shared_kv
    mask = layers.causal_mask(positions, key_positions)
  own = []
  for j, step in enumerate(recursion_steps(cfg, recursion)):
    block = model_lib.select_block(per_step, step)
    attend_to = None if shared_kv is None else layers.attend_to_kv(*layer_kv[j])
    h, kv = model_lib.apply_block(cfg, block, h, positions, mask, attend_to)
    own.append(kv)
  return h, own


def forward_states(cfg: model_lib.ModelConfig, params, tokens, constrain=lambda x: x):
  """The final residual state and the routing. tokens: [B, T] ->
  (h [B, T, D] after the last layer, routers.RoutingOutput)."""
  routing = cfg.routing
  block_cfg = _block_cfg(cfg)
  positions = model_lib.default_positions(tokens)
  batch, seq_len = tokens.shape
  per_step = model_lib.all_step_blocks(cfg, params)
  step_block = lambda s: model_lib.select_block(per_step, s)
  full_mask = layers.causal_mask(positions, positions)

  h = constrain(model_lib.embed(cfg, params, tokens))
  h, _ = model_lib.apply_block(cfg, step_block(0), h, positions, full_mask)
  h = constrain(h)

  capacity = routing.capacity_tokens(seq_len)
  previous = jnp.ones((batch, seq_len), bool)
  if routing.routing == 'token_choice':
    depth_logits = routers.router_logits(routing, params['routers'], h)
    depth, tc_gate = routers.token_choice_depth(routing, depth_logits)
  selected_all, logits_all, dropped, bce_terms = [], [], [], []
  shared_kv = None
  for r in range(routing.recursions):
    if routing.routing == 'expert_choice':
      logits = routers.router_logits(routing, params['routers'], h, r)
      gate = routers.expert_choice_gate(routing, logits)
      eligible = previous
      score = logits
    else:
      gate = tc_gate
      eligible = previous & (depth > r)
      score = gate  # priority when a recursion is over capacity: the router's confidence
    index, valid = routers.top_k_positions(score, eligible, capacity[r])
    gathered = _gather(h, index)
    out, own_kv = _run_recursion(block_cfg, per_step, r, gathered, _gather(positions, index),
                                 valid, shared_kv)
    g = jnp.where(valid, _gather(gate, index), 0.0)
    h = constrain(_scatter(h, index, routers.gated_update(gathered, out, g)))
    selected = jnp.zeros((batch, seq_len), bool).at[jnp.arange(batch)[:, None], index].set(
        valid)
    if routing.kv == 'shared' and r == 0:
      # Recursion 0 ran every token in position order (capacity 1): its K/V, cache layout.
      shared_kv = ([layers.to_cache_layout(*kv) for kv in own_kv], positions)
    if routing.routing == 'expert_choice':
      logits_all.append(logits)
      bce_terms.append(routers.membership_bce(logits, selected, eligible))
    asked = jnp.sum(eligible)
    dropped.append(jnp.sum(eligible & ~selected) / jnp.maximum(asked, 1))
    selected_all.append(selected)
    previous = selected

  h, _ = model_lib.apply_block(cfg, step_block(cfg.num_layers - 1), h, positions, full_mask)
  h = constrain(h)
  selected = jnp.stack(selected_all)
  fractions = selected.mean(axis=(1, 2))
  metrics = {f'selected_recursion_{r + 1}': fractions[r] for r in range(routing.recursions)}
  if routing.routing == 'expert_choice':
    bce = jnp.mean(jnp.stack(bce_terms))
    aux = routing.aux_loss * bce
    metrics['router_bce'] = bce
    router_out = jnp.stack(logits_all)
  else:
    balance, z, max_violation = routers.balance_terms(depth_logits)
    aux = routing.balance_loss * balance + routing.z_loss * z
    metrics.update(router_balance=balance, router_z=z, max_violation=max_violation,
                   dropped=jnp.mean(jnp.stack(dropped)))
    router_out = depth_logits
  metrics['router_loss'] = aux
  return h, routers.RoutingOutput(selected=selected, logits=router_out,
                                  dropped=jnp.stack(dropped), aux_loss=aux, metrics=metrics)



def forward_masked(cfg: model_lib.ModelConfig, params, tokens, threshold=0.5,
                   depths=None):
  """The causal MoR forward over whole sequences, by masking (every token computes every
  recursion; a token that does not run one keeps its state and is hidden from that
  recursion's attention under 'recursion_wise'). Routing is decoding's: routers.route, one
  token at a time, so no position's output or depth depends on a later token.

  tokens: [B, T]; threshold: expert_choice's sigmoid threshold (traced); depths: [B, T]
  recursions each token runs instead of the routers' choice. Returns (h [B, T, D] after the
  last layer, recursions run [B, T] int32). Decoding (decode/mor_decode.py) is tested to
  equal it; it saves nothing (a reference and an analysis tool).
  """
  routing = cfg.routing
  positions = model_lib.default_positions(tokens)
  causal = layers.causal_mask(positions, positions)
  per_step = model_lib.all_step_blocks(cfg, params)
  step_block = lambda s: model_lib.select_block(per_step, s)
  h = model_lib.embed(cfg, params, tokens)
  h, _ = model_lib.apply_block(cfg, step_block(0), h, positions, causal)
  state = routers.RouteState.start(tokens.shape, routing.recursions)
  recursion_zero_kv = []
  for r in range(routing.recursions):
    runs, gate, state = routers.route(routing, params['routers'], h, r, state, threshold,
                                      depths)
    shared = routing.kv == 'shared' and r > 0
    mask = causal if shared else causal & runs[:, None, :]
    x = h
    for j, step in enumerate(recursion_steps(cfg, r)):
      attend_to = layers.attend_to_kv(*recursion_zero_kv[j]) if shared else None
      x, (k, v) = model_lib.apply_block(cfg, step_block(step), x, positions, mask, attend_to)
      if routing.kv == 'shared' and r == 0:
        recursion_zero_kv.append(layers.to_cache_layout(k, v))
    h = routers.gated_update(h, x, gate, runs)
  h, _ = model_lib.apply_block(cfg, step_block(cfg.num_layers - 1), h, positions, causal)
  return h, state.ran
