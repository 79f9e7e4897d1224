"""A plain numpy Llama-style decoder, written independently of the library for tests.

Loops over layers, heads and query positions explicitly; RoPE by complex rotation; float64.
Reads the library's parameter pytree layout (per-layer slices of the stacked blocks).
"""
import numpy as np


def rms_norm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, base):
  """x: [T, N, Dh]; rotates the pair (j, j + Dh/2) as the complex number x_j + i x_{j+Dh/2}."""
  half = x.shape[-1] // 2
  freqs = base ** (-np.arange(half) * 2.0 / x.shape[-1])
  angle = np.asarray(positions, np.float64)[:, None] * freqs[None, :]
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[:, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def attention(x, positions, wq, wk, wv, wo, rope_base, keys=None, key_positions=None):
  """x: [T, D] (normed); wq [D, H, Dh], wk/wv [D, KV, Dh], wo [H, Dh, D]. Causal GQA by
  position. keys / key_positions: other normed states [S, D] and their positions to take K/V
  from (default: x itself)."""
  keys = x if keys is None else keys
  key_positions = positions if key_positions is None else np.asarray(key_positions)
  num_heads, num_kv = wq.shape[1], wk.shape[1]
  group = num_heads // num_kv
  q = rope(np.einsum('td,dnh->tnh', x, wq), positions, rope_base)
  k = rope(np.einsum('td,dnh->tnh', keys, wk), key_positions, rope_base)
  v = np.einsum('td,dnh->tnh', keys, wv)
  out = np.zeros_like(q)
  for head in range(num_heads):
    kv_head = head // group
    for t in range(x.shape[0]):
      visible = key_positions <= positions[t]
      scores = k[visible, kv_head] @ q[t, head] / np.sqrt(q.shape[-1])
      weights = np.exp(scores - scores.max())
      weights /= weights.sum()
      out[t, head] = weights @ v[visible, kv_head]
  return np.einsum('tnh,nhd->td', out, wo)


def swiglu(x, gate, up, down):
  g = x @ gate
  return (g / (1.0 + np.exp(-g)) * (x @ up)) @ down


def block(h, positions, p, eps, rope_base, key_states=None, key_positions=None):
  """One pre-norm block; p is one layer's parameters (numpy). key_states: residual states
  [S, D] (and key_positions) whose K/V the attention reads instead of h's own."""
  a = p['attn']
  keys = None if key_states is None else rms_norm(key_states, p['attn_norm']['scale'], eps)
  h = h + attention(rms_norm(h, p['attn_norm']['scale'], eps), positions,
                    a['q'], a['k'], a['v'], a['o'], rope_base, keys, key_positions)
  m = p['mlp']
  return h + swiglu(rms_norm(h, p['mlp_norm']['scale'], eps), m['gate'], m['up'], m['down'])


def model_exit_logits(params, tokens, block_of_step, exit_depths, eps, rope_base, tied=True):
  """Logits at each exit depth for one row. tokens: [T] -> list of [T, V] per exit."""
  params = _to_numpy(params)
  embedding = params['embed']['embedding']
  head = embedding.T if tied else params['lm_head']['kernel']
  positions = np.arange(len(tokens))
  h = embedding[np.asarray(tokens)]
  outputs = []
  for step, block_index in enumerate(block_of_step):
    layer = _slice(params['blocks'], block_index)
    h = block(h, positions, layer, eps, rope_base)
    if step + 1 in exit_depths:
      outputs.append(rms_norm(h, params['final_norm']['scale'], eps) @ head)
  return outputs


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def _slice(tree, index):
  if isinstance(tree, dict):
    return {k: _slice(v, index) for k, v in tree.items()}
  return tree[index]
