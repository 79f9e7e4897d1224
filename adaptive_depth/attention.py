"""Attention implementations behind `config.model.attention`.

  'xla'                    layers.attend: an einsum over the whole [B, KV, G, T, S] score
                           tensor. The reference the others are tested against; the only
                           one for attention against the decode cache.
  'heads_major'            the same function with 4-D products batched over (batch, KV
                           head), K and V moved head-major first (and told the mask is
                           causal, a long sequence as two halves of its queries: see
                           heads_major); on CPU with a gradient of
                           its own whose products all run in XLA's CPU dot library. That is
                           a custom VJP: on CPU, forward mode (jax.jvp, jacfwd) through it
                           is refused (jax.hessian, forward over reverse, works); any
                           other implementation takes it (a whole model refuses it anyway:
                           layers.gated_silu and norms.rms_norm have custom VJPs). On
                           the 2-core CPU the quickstart train step ran up to 1.07x faster
                           than with 'xla' (launch/train_benchmark.py), and the whole step a
                           further 1.03-1.04x with the gradient (in-process A/B
                           measurements whose scripts are not part of the package; README,
                           Scale).
  'dot_product_attention'  jax.nn.dot_product_attention. On GPU in bfloat16 or float16 it
                           asks for cuDNN's fused causal attention (implementation='cudnn'),
                           falling back to jax's XLA version where cuDNN refuses the call;
                           elsewhere it is jax's XLA version (jax picks no cuDNN by itself).
                           The cuDNN branch is untested here (no GPU).
  'splash'                 Pallas splash attention for TPU (causal, GQA as one MQA kernel per
                           KV head), for sequences of a multiple of 128 tokens; shorter or
                           other lengths (a prefill padded to 16) fall back to 'heads_major'.
                           Off TPU it runs in the Pallas interpreter (the tests do this).
  'auto'                   the best of these for the platform: splash on TPU,
                           dot_product_attention on GPU, heads_major on CPU.

Every implementation computes the same function. Only the self-attention of a block over its
own tokens (training, prefill, scoring) goes through them; decode steps against the KV
cache keep 'xla', whose products run straight on the cache layout. Where a block attends
to its own tokens, the mask is causal in token order (causal_mask of the indices 0..T-1),
in a Mixture-of-Recursions gather with some keys masked as well (that path takes
heads_major, not splash). So no query sees a later token, which heads_major's causal split
relies on; without the extra keys masked it is exactly the index-causal mask splash applies.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('auto', 'xla', 'heads_major', 'dot_product_attention', 'splash')


def resolve(name: str, platform: str | None = None) -> str:
  """The implementation `name` runs as on `platform` (default: jax's default backend):
  'auto' becomes the platform's best; the others stay as they are."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention={name!r}; allowed: {", ".join(IMPLEMENTATIONS)}')
  if name != 'auto':
    return name
  platform = platform or jax.default_backend()
  return {'tpu': 'splash', 'gpu': 'dot_product_attention'}.get(platform, 'heads_major')


def platform_error(name: str, platform: str | None = None) -> str | None:
  """Why `name` cannot run on `platform`, or None."""
  platform = platform or jax.default_backend()
  if resolve(name, platform) == 'splash' and platform != 'tpu':
    allowed = ', '.join(n for n in IMPLEMENTATIONS if n != 'splash')
    return (f"config.model.attention='splash' runs on TPU only (this is {platform}); "
            f'allowed here: {allowed}')
  return None


def tuned_for_cpu() -> bool:
  """Whether the paths measured and shaped for XLA's CPU dot library apply (heads_major's
  gradient, the fused q/k/v product, RMSNorm's scale gradient as a product): jax's default
  backend is the CPU. Elsewhere those places keep autodiff's or the plain form."""
  return jax.default_backend() == 'cpu'


# The shortest sequence heads_major(causal=True) splits in two (the length measured).
CAUSAL_SPLIT_MIN_LEN = 128


def heads_major(q, k, v, mask, causal: bool = False):
  """The 'xla' function with every product 4-D and batched over (batch, KV head): each KV
  head's G query heads and T positions are the G * T rows of one matrix product.

  q: [B, T, H, Dh]; k, v: [B, S, KV, Dh]; mask: [B, T, S] bool -> [B, T, H, Dh].
  causal: the caller's promise that no query attends a later key (mask[:, t, s] is False
  for s > t), which holds wherever a block attends to its own tokens. Then a sequence of an
  even length of at least CAUSAL_SPLIT_MIN_LEN runs as two halves of its queries, the first
  against the first half of the keys only: a quarter of the attention's products and
  softmax is never computed (the quickstart train step 1.03x on the 2-core CPU; README,
  Scale). The result is the same function.
  """
  q_len = q.shape[1]
  if not (causal and q_len == k.shape[1] and q_len % 2 == 0 and q_len >= CAUSAL_SPLIT_MIN_LEN):
    return _heads_major(q, k, v, mask)
  half = q_len // 2
  first_mask = mask[:, :half, :half]
  first = _heads_major(q[:, :half], k[:, :half], v[:, :half], first_mask)
  # A row that sees no key attends evenly to all S keys in the whole function (its scores
  # are all the same constant), not only to the first half's.
  group = q.shape[2] // k.shape[2]
  every_key = jnp.repeat(jnp.mean(v, axis=1, keepdims=True), group, axis=2)  # [B, 1, H, Dh]
  first = jnp.where(jnp.any(first_mask, axis=-1)[..., None, None], first,
                    every_key.astype(first.dtype))
  second = _heads_major(q[:, half:], k, v, mask[:, half:])
  return jnp.concatenate([first, second], axis=1)


def _heads_major(q, k, v, mask):
  """heads_major over every key: q [B, T, H, Dh]; k, v [B, S, KV, Dh]; mask [B, T, S] ->
  [B, T, H, Dh]."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  group = num_heads // num_kv
  rows = q.reshape(batch, q_len, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4).reshape(
      batch, num_kv, group * q_len, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, Dh]
  row_mask = jnp.tile(mask, (1, group, 1))[:, None]  # row g * T + t: query position t
  if tuned_for_cpu():  # its gradient is shaped for the CPU's dot library
    out = _rows_attention(rows, k, v, row_mask)  # [B, KV, G * T, Dh]
  else:
    out = _rows_forward(rows, k, v, row_mask)[0]
  return out.reshape(batch, num_kv, group, q_len, head_dim).transpose(0, 3, 1, 2, 4).reshape(
      batch, q_len, num_heads, head_dim)


def _rows_forward(rows, k, v, row_mask):
  """rows: [B, KV, R, Dh]; k, v: [B, KV, S, Dh]; row_mask: [B, 1, R, S] -> (out [B, KV, R,
  Dh], probabilities [B, KV, R, S] float32)."""
  scores = jnp.einsum('bkrd,bksd->bkrs', rows, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(rows.shape[-1]))
  scores = jnp.where(row_mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum('bkrs,bksd->bkrd', probs.astype(v.dtype), v), probs


@jax.custom_vjp
def _rows_attention(rows, k, v, row_mask):
  """_rows_forward's output ([B, KV, R, Dh]) with the gradient of
  _rows_attention_backward."""
  return _rows_forward(rows, k, v, row_mask)[0]


def _rows_attention_forward(rows, k, v, row_mask):
  out, probs = _rows_forward(rows, k, v, row_mask)
  return out, (rows, k, v, probs, row_mask)


def _transposed(x):
  """x with its last two axes swapped, as an array of its own: the barrier keeps XLA from
  folding the transpose back into the product that reads it."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _rows_attention_backward(residuals, d_out):
  """The gradient autodiff gives, with the two products that contract over the query rows
  (those giving d_k and d_v) computed transposed, from transposed copies of rows and d_out
  ([B, KV, Dh, R]: small next to the [R, S] probabilities). Contracting the rows' axis of
  the probabilities or scores directly is a product XLA's CPU dot library does not take;
  its fallback ran them at about a third of the library's rate (README, Scale)."""
  rows, k, v, probs, row_mask = residuals
  d_probs = jnp.einsum('bkrd,bksd->bkrs', d_out, v, preferred_element_type=jnp.float32)
  d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  # Masked scores were replaced by a constant: no gradient reaches them (as through where).
  d_scores = jnp.where(row_mask, d_scores, 0.0) / jnp.sqrt(jnp.float32(rows.shape[-1]))
  d_rows = jnp.einsum('bkrs,bksd->bkrd', d_scores.astype(k.dtype), k)
  d_k = jnp.einsum('bkdr,bkrs->bkds', _transposed(rows), d_scores.astype(rows.dtype))
  d_v = jnp.einsum('bkdr,bkrs->bkds', _transposed(d_out), probs.astype(d_out.dtype))
  return (d_rows.astype(rows.dtype), jnp.swapaxes(d_k, -1, -2).astype(k.dtype),
          jnp.swapaxes(d_v, -1, -2).astype(v.dtype), None)


_rows_attention.defvjp(_rows_attention_forward, _rows_attention_backward)


def dot_product_attention(q, k, v, mask):
  """q: [B, T, H, Dh]; k, v: [B, S, KV, Dh]; mask: [B, T, S] bool -> [B, T, H, Dh]."""
  if (jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16)
      and q.shape[1] == k.shape[1]):
    try:  # self-attention: `mask` is the index-causal mask (module docstring)
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError):  # a shape or build cuDNN refuses
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


@functools.lru_cache(maxsize=None)
def _splash_kernel(group: int, q_len: int, kv_len: int, interpret: bool):
  """One causal MQA kernel (the `group` query heads of one KV head), built once per shape."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  causal = mask_lib.MultiHeadMask([mask_lib.CausalMask((q_len, kv_len))] * group)
  # The largest block up to 512 that divides the length (lengths are multiples of 128).
  block_q, block_kv = math.gcd(512, q_len), math.gcd(512, kv_len)
  sizes = kernel_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                block_q_dkv=block_q, block_kv_dkv=block_kv,
                                block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                                block_kv_dq=block_kv)
  return kernel_lib.make_splash_mqa(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)


def splash_applies(q_len: int, kv_len: int) -> bool:
  """Whether splash can run a self-attention call of these lengths (its blocks span whole
  128-lane tiles); the others fall back to heads_major."""
  return q_len == kv_len and q_len % 128 == 0


def splash(q, k, v, interpret: bool | None = None):
  """Causal splash attention. q: [B, T, H, Dh]; k, v: [B, T, KV, Dh] -> [B, T, H, Dh], T a
  multiple of 128 (splash_applies). interpret: run the kernel in the Pallas interpreter
  (default: off TPU only)."""
  batch, q_len, num_heads, head_dim = q.shape
  if not splash_applies(q_len, k.shape[1]):
    raise ValueError(f'splash needs equal query and key lengths of a multiple of 128; got '
                     f'{q_len} and {k.shape[1]}')
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
  num_kv = k.shape[2]
  group = num_heads // num_kv
  kernel = _splash_kernel(group, q_len, k.shape[1], interpret)
  # The kernel takes unscaled queries: scale them as the reference scales the scores.
  q = (q / np.sqrt(head_dim).astype(np.float32)).astype(q.dtype)
  q = q.reshape(batch, q_len, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)  # [B,KV,G,T,Dh]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, Dh]
  out = jax.vmap(jax.vmap(kernel))(q, k, v)  # [B, KV, G, T, Dh]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)
