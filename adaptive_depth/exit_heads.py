"""Per-exit heads: what each early exit reads before the shared output projection.

Without them every exit reads the residual stream through the final norm, which suits a
model trained with early exits but not a pretrained one, whose middle layers were never
read that way. With `config.model.exit_norms` each early exit e < E-1 gets an RMSNorm
scale of its own; with `config.model.exit_adapter_rank` R > 0 also a low-rank residual
adapter, so that exit e projects

    rms_norm(h + (h @ a_e) @ b_e) * scale_e        a_e: [D, R], b_e: [R, D] (zero at init)

The last exit always reads through final_norm alone, so full-depth outputs never depend on
these parameters (params['exit_heads'], layout in model.py). `cfg` below is a
model.ModelConfig.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import norms


def init_boxed(cfg, rng, final_norm_scale=None) -> dict:
  """Boxed per-exit head parameters for the E-1 early exits. Norm scales start at
  final_norm_scale ([D]; default ones), adapters at a ~ N(0, 1/D), b = 0: at
  initialisation every early exit reads exactly as it would through final_norm."""
  early = len(cfg.exit_depths) - 1
  heads = {}
  if cfg.exit_norms:
    scale = (jnp.ones((cfg.width,)) if final_norm_scale is None
             else jnp.asarray(final_norm_scale, jnp.float32))
    heads['norm'] = nn.LogicallyPartitioned(jnp.tile(scale[None], (early, 1)),
                                            ('exits', 'norm'))
  if cfg.exit_adapter_rank:
    rank = cfg.exit_adapter_rank
    a = jax.random.normal(rng, (early, cfg.width, rank)) / np.sqrt(cfg.width)
    heads['adapter'] = {
        'a': nn.LogicallyPartitioned(a, ('exits', 'adapter_embed', 'adapter_rank')),
        'b': nn.LogicallyPartitioned(jnp.zeros((early, rank, cfg.width)),
                                     ('exits', 'adapter_rank', 'adapter_embed'))}
  return heads


def init_exit_heads(cfg, rng, final_norm_scale=None) -> dict:
  """Fresh params['exit_heads'] (float32), e.g. for a trunk imported without them; pass
  the trunk's final_norm scale [D] so that the early exits start as they read before."""
  return nn.unbox(init_boxed(cfg, rng, final_norm_scale))


# exit_number meaning "h is [E, ..., D], one slice per exit in order" (forward_train).
ALL_EXITS = 'all'


def exit_normed(cfg, params, h, exit_number=None):
  """What an exit head projects: the (adapted) hidden state through the exit's norm.

  h: [..., D] -> [..., D] in the compute dtype. exit_number: None for the last exit; an int
  (static or traced) for one exit; an int array broadcastable to h.shape[:-1] for each
  token its own exit; or ALL_EXITS when h is [E, ..., D]. Without per-exit heads every
  exit reads through final_norm and exit_number is ignored.
  """
  if exit_number is None or not cfg.has_exit_heads:
    return cfg.final_norm.apply({'params': params['final_norm']}, h)
  num_exits = len(cfg.exit_depths)
  stacked = isinstance(exit_number, str)
  if stacked:
    if exit_number != ALL_EXITS or h.shape[0] != num_exits:
      raise ValueError(f'exit_number={exit_number!r} with h of shape {h.shape}: ALL_EXITS '
                       f'needs h stacked over the {num_exits} exits on its first axis')
    number = np.arange(num_exits).reshape((num_exits,) + (1,) * (h.ndim - 2))
  else:
    number = jnp.asarray(exit_number, jnp.int32)
  heads = params['exit_heads']
  if cfg.exit_adapter_rank:
    h = h + _adapter_delta(cfg, heads['adapter'], h, number, stacked).astype(h.dtype)
  scale = params['final_norm']['scale']
  if cfg.exit_norms:  # the last exit's row is final_norm's own scale
    scale = jnp.concatenate([heads['norm'], scale[None]])[number]
  return norms.rms_norm(h, scale, cfg.norm_eps, cfg.compute_dtype)


def _adapter_delta(cfg, adapter, h, number, stacked: bool):
  """(h @ a_e) @ b_e for each token's exit e. h: [..., D] -> [..., D]."""
  # The last exit has no adapter: zero factors keep its input exactly h.
  pad = lambda w: jnp.concatenate([w, jnp.zeros_like(w[:1])]).astype(cfg.compute_dtype)
  a, b = pad(adapter['a']), pad(adapter['b'])  # [E, D, R], [E, R, D]
  if stacked:
    return jnp.einsum('e...r,erd->e...d', jnp.einsum('e...d,edr->e...r', h, a), b)
  if number.ndim == 0:
    return (h @ a[number]) @ b[number]
  # Tokens at different exits: every exit's rank-R code, kept only for the token's own
  # exit (E * R * D per token: small next to the D x V projection that follows).
  own = number[..., None] == jnp.arange(a.shape[0])
  codes = jnp.where(own[..., None], jnp.einsum('...d,edr->...er', h, a), 0)
  return jnp.einsum('...er,erd->...d', codes.astype(b.dtype), b)

