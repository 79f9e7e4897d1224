"""Transformer building blocks: rotary embeddings, grouped-query attention, SwiGLU, the block
(its RMSNorm is in norms.py).

Every module is a Flax Linen module used as a pure function: `init` makes an explicit
parameter pytree and `apply` runs it. Parameters are created in float32 and cast to the
compute dtype at use; normalisation, softmax and RoPE run in float32 whatever the compute
dtype, because they are where low precision hurts.

Parameters carry logical axis names (`nn.with_logical_partitioning`) so that the sharding
rules in the config can map them onto a device mesh; `model.param_logical_axes` reads them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import attention as attention_lib
from adaptive_depth.norms import RMSNorm


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
  """What one transformer block needs to know; built from `config.model`."""
  width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02
  # Output projections (attention out, MLP down) start smaller so that the residual stream
  # does not grow with depth: std / sqrt(2 * num_steps), as in GPT-2.
  residual_init_scale: float = 1.0
  # Additive biases on the q, k, v projections (Qwen2 checkpoints have them).
  qkv_bias: bool = False
  # How a block attends to its own tokens (attention.py; resolved: never 'auto').
  attention: str = 'xla'


def _dense_init(std):
  return nn.initializers.normal(stddev=std)


def dense(x, w, in_dims: int = 1):
  """Contracts the last `in_dims` axes of x with the first `in_dims` axes of w.

  x: [..., *in]; w: [*in, *out] -> [..., *out]. Done as one 2-D matrix product because on
  XLA:CPU the gradient of a 2-D product runs about 1.4x faster than that of the equivalent
  batched einsum (the weight gradient contracts over batch and length at once).
  """
  lead, contract = x.shape[:x.ndim - in_dims], w.shape[:in_dims]
  out = w.shape[in_dims:]
  flat = x.reshape(-1, int(np.prod(contract))) @ w.reshape(int(np.prod(contract)), -1)
  return flat.reshape(*lead, *out)


def row_lora_delta(x, factors, in_dims: int, out_shape):
  """Unmerged low-rank delta with factors of its own for each row: (x @ a[b]) @ b[b].

  x: [B, T, *in] (the last `in_dims` axes are contracted); factors {'a': [B, I, r],
  'b': [B, r, O]} with I = prod(in), O = prod(out_shape) -> [B, T, *out_shape]. Rows at
  different loop steps share one call of the block's weights this way, which a delta merged
  into the kernel (one kernel per step) would not allow.
  """
  batch, length = x.shape[:2]
  flat = x.reshape(batch, length, -1)
  low = jnp.einsum('bti,bir->btr', flat, factors['a'].astype(x.dtype))
  out = jnp.einsum('btr,bro->bto', low, factors['b'].astype(x.dtype))
  return out.reshape(batch, length, *out_shape)


def rope_frequencies(head_dim: int, base: float) -> jnp.ndarray:
  """Inverse frequencies [head_dim // 2] of the rotary embedding."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def _rope_table(positions, head_dim: int, base: float):
  """(cos, sin) of the rotary angles, each [B, T, head_dim // 2] float32, materialised.

  Left as plain elementwise operations, XLA (on CPU at least) fuses the cosine and sine
  into every consumer and recomputes them per head and per use, forward and backward: two
  transcendental functions per element of q and k, a large share of a small model's train
  step on CPU (README, Scale). A product with the identity is an operation XLA does not
  fuse into its consumers, so the table is computed once per forward pass and shared by
  the layers with the same positions (lax.optimization_barrier did not stop the fusion: XLA
  removes it first). HIGHEST precision: TPU would otherwise round a float32 product's
  operands through bfloat16.
  """
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, base)
  table = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  table = jnp.matmul(table, jnp.eye(head_dim, dtype=jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return table[..., : head_dim // 2], table[..., head_dim // 2:]


def apply_rope(x, positions, base: float):
  """Rotates pairs (i, i + head_dim/2) of x by angle position * freq_i.

  x: [B, T, N, Dh]; positions: [B, T] int. Returns x's shape and dtype. The half-split pairing
  is the convention of Llama checkpoints in Hugging Face layout.
  """
  head_dim = x.shape[-1]
  cos, sin = _rope_table(positions, head_dim, base)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def attend(q, k, v, mask, cache_layout: bool = False, implementation: str = 'xla',
           causal: bool = False):
  """Grouped-query attention on already-projected, already-rotated heads.

  q: [B, T, H, Dh]; k, v: [B, S, KV, Dh], or with cache_layout the KV cache's layout
  (to_cache_layout: k [B, KV, Dh, S], v [B, KV, S, Dh]); KV divides H; mask: [B, T, S]
  bool, True where query t may attend key s. Returns [B, T, H, Dh]. Query head h reads KV
  head h // (H / KV). implementation: one of attention.IMPLEMENTATIONS but 'auto', for
  attention without the cache ('splash' applies the index-causal mask, which is what `mask`
  is there; see attention.py). causal: no query attends a later key (mask[:, t, s] False for
  s > t), which heads_major uses to skip work (attention.heads_major).
  """
  if implementation == 'dot_product_attention' and not cache_layout:
    return attention_lib.dot_product_attention(q, k, v, mask)
  if implementation == 'splash' and not cache_layout:
    if attention_lib.splash_applies(q.shape[1], k.shape[1]):
      return attention_lib.splash(q, k, v)
    implementation = 'heads_major'  # e.g. a prefill padded to 16 tokens
  if implementation == 'heads_major' and not cache_layout:
    return attention_lib.heads_major(q, k, v, mask, causal)
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[1 if cache_layout else 2]
  group = num_heads // num_kv
  q = q.reshape(batch, q_len, num_kv, group, head_dim)
  if cache_layout:
    return _attend_cache_layout(q, k, v, mask).reshape(batch, q_len, num_heads, head_dim)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(batch, q_len, num_heads, head_dim)


def to_cache_layout(k, v):
  """(k, v) [B, T, KV, Dh] -> the KV cache's layout: k [B, KV, Dh, T], v [B, KV, T, Dh].

  K/V heads first, so that a row's keys and values for one head are a matrix each, which
  the attention products take as they are (_attend_cache_layout). Keys with positions last:
  the scores product q @ k then reads k as a plain [Dh, S] right-hand matrix. With k
  [S, Dh], XLA's CPU dot library (YNNPACK) packs a transpose of it first: in a
  micro-benchmark of 12 layers' decode attention alone on the 2-core CPU, that took 1.39x
  as long at batch 8 with 289 positions, 1.32x at batch 1.
  """
  return k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


def _attend_cache_layout(q, k, v, mask):
  """q: [B, T, KV, G, Dh]; k: [B, KV, Dh, S], v: [B, KV, S, Dh] -> [B, T, KV, G, Dh].

  Both products are dot_generals batched over (B, KV), with a KV head's queries (T
  positions x G heads) as the rows: one matrix product per (row, KV head), straight on the
  cache layout. The einsum form made XLA on CPU transpose K and V around the products,
  which in decoding (T = 1) cost three times the products themselves.
  """
  batch, q_len, num_kv, group, head_dim = q.shape
  rows = q.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv, q_len * group, head_dim)
  batch_dims = ((0, 1), (0, 1))
  scores = jax.lax.dot_general(rows, k, (((3,), (2,)), batch_dims),
                               preferred_element_type=jnp.float32)  # [B, KV, T * G, S]
  scores = scores.reshape(batch, num_kv, q_len, group, -1) / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jax.lax.dot_general(probs.reshape(batch, num_kv, q_len * group, -1), v,
                            (((3,), (2,)), batch_dims))  # [B, KV, T * G, Dh]
  return out.reshape(batch, num_kv, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)


def attend_to_kv(k, v):
  """An Attention attend_to that attends to k [B, KV, Dh, S], v [B, KV, S, Dh] (the cache
  layout) instead of the call's own K/V."""
  return lambda q, own_k, own_v, mask: attend(q, k, v, mask, cache_layout=True)


def causal_mask(q_positions, kv_positions):
  """[B, T] and [B, S] int positions -> [B, T, S] bool, key position <= query position."""
  return kv_positions[:, None, :] <= q_positions[:, :, None]


class Attention(nn.Module):
  """Multi-head attention with grouped K/V heads and RoPE.

  The projections are exposed separately (`project_kv`) because decode-time KV policies
  compute K/V for skipped layers without running the rest of the block.
  """
  config: BlockConfig

  def setup(self):
    c = self.config
    init = _dense_init(c.init_std)
    out_init = _dense_init(c.init_std * c.residual_init_scale)
    self.q = self.param('q', nn.with_logical_partitioning(init, ('embed', 'heads', 'head_dim')),
                        (c.width, c.num_heads, c.head_dim), jnp.float32)
    self.k = self.param('k', nn.with_logical_partitioning(init, ('embed', 'kv_heads', 'head_dim')),
                        (c.width, c.num_kv_heads, c.head_dim), jnp.float32)
    self.v = self.param('v', nn.with_logical_partitioning(init, ('embed', 'kv_heads', 'head_dim')),
                        (c.width, c.num_kv_heads, c.head_dim), jnp.float32)
    self.o = self.param('o', nn.with_logical_partitioning(out_init, ('heads', 'head_dim', 'embed')),
                        (c.num_heads, c.head_dim, c.width), jnp.float32)
    if c.qkv_bias:  # only then, so that bias-free parameter trees stay as they were
      bias = lambda name, heads, axis: self.param(
          name, nn.with_logical_partitioning(nn.initializers.zeros, (axis, 'head_dim')),
          (heads, c.head_dim), jnp.float32)
      self.q_bias = bias('q_bias', c.num_heads, 'heads')
      self.k_bias = bias('k_bias', c.num_kv_heads, 'kv_heads')
      self.v_bias = bias('v_bias', c.num_kv_heads, 'kv_heads')

  def _cast(self, w):
    return jnp.asarray(w, self.config.dtype)

  def _project(self, x, name, row_lora=None, product=None):
    """x: [B, T, D] -> [B, T, N, Dh] through projection `name` (q, k or v), plus its bias
    (and the per-row LoRA delta, when row_lora holds factors; see row_lora_delta).
    product: x times the kernel, when already computed."""
    out = dense(x, self._cast(getattr(self, name))) if product is None else product
    if row_lora is not None:
      out = out + row_lora_delta(x, row_lora[name], 1, out.shape[2:])
    if self.config.qkv_bias:
      out = out + self._cast(getattr(self, f'{name}_bias'))
    return out

  def project_kv(self, x, positions, row_lora=None, products=(None, None)):
    """x: [B, T, D] (normed) -> rotated k, v: [B, T, KV, Dh]. products: x times the k and v
    kernels, when already computed (_project_qkv)."""
    k = self._project(x, 'k', row_lora, products[0])
    v = self._project(x, 'v', row_lora, products[1])
    return apply_rope(k, positions, self.config.rope_base), v

  def _project_qkv(self, x, positions, row_lora=None):
    """x: [B, T, D] (normed) -> rotated q [B, T, H, Dh] and project_kv's rotated k, v.

    On CPU over several tokens, one product against the three kernels side by side: x is
    read once, and the gradient for x is one product where three were summed (the quickstart
    train step 1.03x on the 2-core CPU; README, Scale). For one token (a decode step) the
    products stay apart: there copying the kernels side by side would cost more than the
    products, which then read little more than the kernels. Elsewhere they stay apart too:
    unmeasured there, and kernels sharded over their heads would have to be regathered.
    """
    products = (None,) * 3  # each _project makes its own
    if x.shape[1] > 1 and attention_lib.tuned_for_cpu():
      kernels = [self._cast(getattr(self, name)) for name in ('q', 'k', 'v')]
      products = jnp.split(dense(x, jnp.concatenate(kernels, axis=1)),
                           np.cumsum([w.shape[1] for w in kernels[:2]]), axis=2)
    q = apply_rope(self._project(x, 'q', row_lora, products[0]), positions,
                   self.config.rope_base)
    return q, self.project_kv(x, positions, row_lora, products[1:])

  def __call__(self, x, positions, mask, attend_to: Optional[Callable] = None, row_lora=None):
    """x: [B, T, D] normed input; positions: [B, T]; mask: [B, T, S].

    attend_to: optional function (q [B, T, H, Dh], k, v [B, T, KV, Dh], mask) ->
    [B, T, H, Dh], the attention of this call's queries to other keys than their own
    tokens' (k, v are this call's own): the decode cache (kv_cache.cached_call) or given
    K/V (attend_to_kv). Without it the call attends to its own tokens (S = T), and `mask`
    must let no query see a later token (False for s > t; every caller's mask is causal in
    token order), which heads_major's causal split relies on.
    row_lora: optional per-row LoRA factors {q, k, v, o} (see row_lora_delta). Returns
    (out [B, T, D], (k, v) [B, T, KV, Dh] of this call).
    """
    q, own_kv = self._project_qkv(x, positions, row_lora)
    if attend_to is None:  # its own tokens: no query attends a later one
      out = attend(q, *own_kv, mask, implementation=self.config.attention, causal=True)
    else:
      out = attend_to(q, *own_kv, mask)
    projected = dense(out, self._cast(self.o), in_dims=2)
    if row_lora is not None:
      projected = projected + row_lora_delta(out, row_lora['o'], 2, projected.shape[2:])
    return projected, own_kv


@jax.custom_vjp
def gated_silu(gate, up):
  """silu(gate) * up, elementwise, with a gradient that keeps only gate and up.

  Differentiated through, the product saved sigmoid(gate) and silu(gate) as well and read
  them back in separate passes; on the CPU each pass over a [B, T, mlp] tensor is about as
  long as a third of the matrix product beside it. Here the forward is one pass and the
  backward one pass that recomputes the sigmoid.
  """
  return jax.nn.silu(gate) * up


def _gated_silu_forward(gate, up):
  return gated_silu(gate, up), (gate, up)


def _gated_silu_backward(saved, grad):
  gate, up = saved
  sigmoid = jax.nn.sigmoid(gate)
  silu = gate * sigmoid
  # d silu / d gate = sigmoid + silu * (1 - sigmoid)
  return grad * up * (sigmoid + silu * (1 - sigmoid)), grad * silu


gated_silu.defvjp(_gated_silu_forward, _gated_silu_backward)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)). x: [B, T, D] -> [B, T, D]."""
  config: BlockConfig

  @nn.compact
  def __call__(self, x, row_lora=None):
    """row_lora: optional per-row LoRA factors {gate, up, down} (see row_lora_delta)."""
    c = self.config
    init = _dense_init(c.init_std)
    out_init = _dense_init(c.init_std * c.residual_init_scale)
    gate = self.param('gate', nn.with_logical_partitioning(init, ('embed', 'mlp')),
                      (c.width, c.mlp_dim), jnp.float32)
    up = self.param('up', nn.with_logical_partitioning(init, ('embed', 'mlp')),
                    (c.width, c.mlp_dim), jnp.float32)
    down = self.param('down', nn.with_logical_partitioning(out_init, ('mlp', 'embed')),
                      (c.mlp_dim, c.width), jnp.float32)
    cast = lambda w: jnp.asarray(w, c.dtype)
    def project(x, w, name):
      out = dense(x, cast(w))
      if row_lora is not None:
        out = out + row_lora_delta(x, row_lora[name], 1, out.shape[2:])
      return out
    hidden = gated_silu(project(x, gate, 'gate'), project(x, up, 'up'))
    return project(hidden, down, 'down')


class Block(nn.Module):
  """Pre-norm transformer block: h + attn(norm(h)), then + mlp(norm(h))."""
  config: BlockConfig

  def setup(self):
    c = self.config
    self.attn_norm = RMSNorm(eps=c.norm_eps, dtype=c.dtype)
    self.attn = Attention(c)
    self.mlp_norm = RMSNorm(eps=c.norm_eps, dtype=c.dtype)
    self.mlp = SwiGLU(c)

  def __call__(self, h, positions, mask, attend_to=None, row_lora=None):
    """h: [B, T, D] residual stream. Returns (h_out [B, T, D], (k, v) [B, T, KV, Dh]).

    row_lora: optional {'attn': ..., 'mlp': ...} LoRA factors with a leading [B] axis, one
    set per row, applied unmerged (each row may run a different loop step of this block).
    """
    lora = row_lora or {}
    attn_out, own_kv = self.attn(self.attn_norm(h), positions, mask, attend_to,
                                 lora.get('attn'))
    h = h + attn_out.astype(h.dtype)
    h = h + self.mlp(self.mlp_norm(h), lora.get('mlp')).astype(h.dtype)
    return h, own_kv

  def kv_only(self, h, positions, row_lora=None):
    """K/V of this block for residual state h, without the rest of the block.

    This is what CALM's state propagation costs per skipped layer: one norm and two
    projections. h: [B, T, D] -> (k, v) [B, T, KV, Dh].
    """
    lora = (row_lora or {}).get('attn')
    return self.attn.project_kv(self.attn_norm(h), positions, lora)
