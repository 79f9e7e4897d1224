"""FLOPs per token, for reporting compute spent against full depth.

Counts multiply-adds as 2 FLOPs, matrix products only (norms, RoPE and softmax
exponentials are small next to them), at a given attention context length. Confidence is
not free: a softmax measure computes the exit head (a D x V product), which for a small
model with a large vocabulary costs as much as several layers.
"""
from __future__ import annotations

import numpy as np

from adaptive_depth import model as model_lib


def block_flops(cfg: model_lib.ModelConfig, context: float) -> float:
  """One block for one token attending to `context` positions."""
  d, h, kv, dh, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  projections = 2 * d * (h * dh + 2 * kv * dh) + 2 * h * dh * d
  mlp = 2 * 3 * d * f
  attention = 2 * 2 * h * dh * context  # scores and weighted values
  return float(projections + mlp + attention)


def kv_projection_flops(cfg: model_lib.ModelConfig) -> float:
  """K and V projections only: what state propagation costs per skipped layer."""
  return float(2 * 2 * cfg.width * cfg.num_kv_heads * cfg.head_dim)


def head_flops(cfg: model_lib.ModelConfig) -> float:
  """The exit head's output projection."""
  return float(2 * cfg.width * cfg.vocab_size)


def confidence_flops(cfg: model_lib.ModelConfig, measure: str, classifier_hidden: int = 64) -> float:
  """Cost of one confidence check at one exit (including its exit head when needed)."""
  if measure == 'saturation':
    return float(3 * cfg.width)
  if measure == 'never':
    return 0.0
  cost = head_flops(cfg) + 5.0 * cfg.vocab_size  # head + softmax statistics
  cost += 4.0 * cfg.width * cfg.exit_adapter_rank  # an early exit's adapter, if any
  if measure == 'classifier':
    cost += 2.0 * (cfg.width + 3 + len(cfg.exit_depths)) * classifier_hidden
  return cost


def checks_before(cfg: model_lib.ModelConfig, exit_depth: np.ndarray, min_depth: int = 1) -> np.ndarray:
  """How many confidence checks a token exiting at `exit_depth` paid for. The last depth is
  never checked (everything left exits there)."""
  checked = np.asarray([d for d in cfg.exit_depths if d < cfg.num_layers and d >= min_depth])
  exit_depth = np.asarray(exit_depth)
  return (checked[None, :] <= exit_depth.reshape(-1, 1)).sum(-1).reshape(exit_depth.shape)


KV_COSTS = ('none', 'propagate', 'parallel', 'propagate_once')


def token_flops(cfg: model_lib.ModelConfig, exit_depth, measure: str, context: float,
                min_depth: int = 1, kv: str = 'none') -> np.ndarray:
  """FLOPs each token spent, given its exit depth ([...] int) -> [...] float.

  Tokens that exit early reuse the exit logits they computed for their last check; tokens
  that reach the last layer pay for the final head. kv: what the skipped layers cost in
  decode: 'none' (scoring, no cache), 'propagate' (their K/V projections, CALM), 'parallel'
  (the whole skipped layers, run later when the token catches up: exact K/V),
  'propagate_once' (the depth-wise batching engine on shared blocks without LoRA: the frozen
  state gives each block the same K/V at every skipped step, computed once per block).
  """
  if kv not in KV_COSTS:
    raise ValueError(f'kv={kv!r}; allowed: {", ".join(KV_COSTS)}')
  exit_depth = np.asarray(exit_depth)
  cost = exit_depth * block_flops(cfg, context)
  cost = cost + checks_before(cfg, exit_depth, min_depth) * confidence_flops(cfg, measure)
  if measure == 'saturation':
    cost = cost + head_flops(cfg)  # the output logits still need one head
  else:
    cost = cost + np.where(exit_depth == cfg.num_layers, head_flops(cfg), 0.0)
  if kv == 'propagate':
    cost = cost + (cfg.num_layers - exit_depth) * kv_projection_flops(cfg)
  elif kv == 'propagate_once':
    skipped = np.minimum(cfg.num_layers - exit_depth, cfg.num_blocks)
    cost = cost + skipped * kv_projection_flops(cfg)
  elif kv == 'parallel':
    cost = cost + (cfg.num_layers - exit_depth) * block_flops(cfg, context)
  return cost


def policy_token_flops(cfg: model_lib.ModelConfig, exit_depth, policy, context: float,
                       kv: str = 'none') -> np.ndarray:
  """token_flops for tokens decoded under an exits.ExitPolicy (concrete values): checks run
  from exit_at on when it forces the exit, else from min_depth (depth.checks_at), and an exit
  forced under measure 'never' still reads its exit's head."""
  exit_depth = np.asarray(exit_depth)
  exit_at, min_depth = np.asarray(policy.exit_at), np.asarray(policy.min_depth)
  first_check = int(np.min(np.where(exit_at > 0, exit_at, min_depth)))
  spent = token_flops(cfg, exit_depth, policy.measure, context, first_check, kv=kv)
  if policy.measure == 'never':
    spent = spent + np.where(exit_depth < cfg.num_layers, head_flops(cfg), 0.0)
  return spent


def full_depth_flops(cfg: model_lib.ModelConfig, context: float) -> float:
  """A token through every layer and the final head, with no checks."""
  return cfg.num_layers * block_flops(cfg, context) + head_flops(cfg)


def prefill_flops(cfg: model_lib.ModelConfig, padded_lengths) -> float:
  """Prompts run at full depth, each padded to its length in `padded_lengths` (what the
  prefill computes: pad positions too, and every query against the whole padded prompt, as
  the dense scores product does), plus one head call each for the first new token."""
  return float(sum(n * cfg.num_layers * block_flops(cfg, n) + head_flops(cfg)
                   for n in np.asarray(padded_lengths).tolist()))


def relative_flops(cfg: model_lib.ModelConfig, exit_depth, measure: str, context: float,
                   min_depth: int = 1, kv: str = 'none') -> float:
  """Mean FLOPs spent over full-depth FLOPs (1.0 = no saving; can exceed 1)."""
  spent = token_flops(cfg, exit_depth, measure, context, min_depth, kv)
  return float(np.mean(spent) / full_depth_flops(cfg, context))


def router_flops(cfg: model_lib.ModelConfig) -> float:
  """One router call on one token: expert_choice's router of one recursion (one logit), or
  token_choice's single router (N_r logits)."""
  routing = cfg.routing
  outputs = 1 if routing.routing == 'expert_choice' else routing.recursions
  if routing.router == 'mlp':
    return float(2 * cfg.width * routing.router_hidden + 2 * routing.router_hidden * outputs)
  return float(2 * cfg.width * outputs)


def mor_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int,
                        capacity_tokens=None) -> float:
  """Forward FLOPs per token of the train-mode MoR forward (mor.forward_states) on
  sequences of T = seq_len tokens, averaged over the sequence.

  Counted: the unique first and last layers on every token (causal attention over (T+1)/2
  positions on average); at recursion r, K blocks on the k_r gathered tokens of a row
  (capacity_tokens, default the config's), whose attention reads (k_r + 1) / 2 gathered
  tokens on average ('recursion_wise'), or, after recursion 1 under 'shared', the (T+1)/2
  positions of recursion 1's K/V without projecting K/V of their own; the routers (every
  token scored by each recursion's router for expert_choice, once for token_choice); the
  final head. A model without routers is the same count with every k_r = T.
  """
  routing = cfg.routing
  per_recursion = cfg.num_blocks - 2
  recursions = (cfg.num_layers - 2) // per_recursion
  if capacity_tokens is None:
    capacity_tokens = (routing.capacity_tokens(seq_len) if routing is not None
                       else (seq_len,) * recursions)
  full_context = (seq_len + 1) / 2
  total = 2 * seq_len * block_flops(cfg, full_context)
  shared_kv = routing is not None and routing.kv == 'shared'
  for r, kept in enumerate(capacity_tokens):
    if shared_kv and r > 0:
      per_token = block_flops(cfg, full_context) - kv_projection_flops(cfg)
    else:
      per_token = block_flops(cfg, (kept + 1) / 2)
    total += per_recursion * kept * per_token
  if routing is not None:
    calls = recursions if routing.routing == 'expert_choice' else 1
    total += calls * seq_len * router_flops(cfg)
  total += seq_len * head_flops(cfg)
  return total / seq_len


def mor_decode_flops(cfg: model_lib.ModelConfig, loop_depth, context: float) -> np.ndarray:
  """FLOPs a Mixture-of-Recursions token spent in decoding, given its loop depth ([...] int:
  2 + recursions run x blocks per recursion) -> [...] float. The first and last layers, the
  recursions it ran (under 'shared', recursions after the first project no K/V of their
  own), the routers it consulted (expert_choice: one per recursion reached, including the
  one that stopped it; token_choice: one), the head. Attention reads `context` positions
  at every layer (an upper bound under 'recursion_wise', where a recursion attends only to
  the positions that ran it)."""
  routing = cfg.routing
  per = cfg.num_blocks - 2
  ran = (np.asarray(loop_depth) - 2) // per
  block = block_flops(cfg, context)
  cost = 2 * block + head_flops(cfg) + ran * per * block
  if routing.kv == 'shared':
    cost = cost - np.maximum(ran - 1, 0) * per * kv_projection_flops(cfg)
  if routing.routing == 'expert_choice':
    cost = cost + np.minimum(ran + 1, routing.recursions) * router_flops(cfg)
  else:
    cost = cost + router_flops(cfg)
  return cost


def mor_every_recursion_flops(cfg: model_lib.ModelConfig, context: float) -> float:
  """mor_decode_flops of a token that runs every recursion: what decoding reports against."""
  return float(mor_decode_flops(cfg, cfg.num_layers, context))
