"""Mixture-of-Recursions in plain numpy, one row at a time, for tests: each recursion is
applied to the selected tokens only (a Python list of positions), never by masking."""
import numpy as np

from tests import numpy_reference as ref


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def mor_row_logits(params, tokens, routing, num_blocks, eps, rope_base):
  """Final-output logits [T, V] of one row. routing: a routers.RoutingConfig (read for its
  fields only); params: the library's pytree (linear routers, tied embeddings)."""
  params = ref._to_numpy(params)
  embedding = params['embed']['embedding']
  per = num_blocks - 2
  seq_len = len(tokens)
  positions = np.arange(seq_len)
  h = embedding[np.asarray(tokens)]
  h = ref.block(h, positions, ref._slice(params['blocks'], 0), eps, rope_base)
  kernel = params['routers']['kernel']
  previous = np.ones(seq_len, bool)
  if routing.routing == 'token_choice':
    logits = h @ kernel
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    depth = logits.argmax(-1) + 1
    tc_gate = probs[np.arange(seq_len), depth - 1]
  recursion_zero_inputs = []
  for r in range(routing.recursions):
    if routing.routing == 'expert_choice':
      score = h @ kernel[r]
      gate = _sigmoid(score)
      eligible = previous
      capacity = int(np.ceil(seq_len * routing.capacities[r] - 1e-9))
    else:
      gate = score = tc_gate
      eligible = previous & (depth > r)
      n = routing.recursions
      capacity = int(np.ceil(routing.capacity_factor * seq_len * (n - r) / n))
    gate = np.ones(seq_len) if routing.gate == 'pass_through' else routing.alpha * gate
    candidates = [t for t in np.argsort(-score, kind='stable') if eligible[t]]
    chosen = np.sort(np.asarray(candidates[:capacity], int))
    x, pos = h[chosen], positions[chosen]
    for j in range(per):
      layer = ref._slice(params['blocks'], 1 + j)
      if routing.kv == 'shared' and r > 0:
        x = ref.block(x, pos, layer, eps, rope_base, recursion_zero_inputs[j], positions)
      else:
        if r == 0:
          recursion_zero_inputs.append(x.copy())
        x = ref.block(x, pos, layer, eps, rope_base)
    h = h.copy()
    h[chosen] = h[chosen] + gate[chosen, None] * (x - h[chosen])
    previous = np.zeros(seq_len, bool)
    previous[chosen] = True
  h = ref.block(h, positions, ref._slice(params['blocks'], num_blocks - 1), eps, rope_base)
  return ref.rms_norm(h, params['final_norm']['scale'], eps) @ embedding.T
