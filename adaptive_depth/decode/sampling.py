"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p.

Every knob is a traced value, so changing temperature or top-p never recompiles.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Greedy:
  """argmax of the logits."""


@flax.struct.dataclass
class Sampling:
  """Sample from softmax(logits / temperature), restricted to the top_k most likely tokens
  (0 = all) and to the smallest set whose probability reaches top_p (1.0 = all)."""
  temperature: Any = 1.0
  top_k: Any = 0
  top_p: Any = 1.0


def check_sampling(sampling) -> None:
  """Raises ValueError naming the field and its allowed range, before anything compiles.
  Traced knobs cannot be checked and pass through."""
  if isinstance(sampling, Greedy):
    return
  if not isinstance(sampling, Sampling):
    raise ValueError(f'sampling={sampling!r}; allowed: adaptive_depth.Greedy() or '
                     'adaptive_depth.Sampling(temperature=..., top_k=..., top_p=...)')
  limits = (('temperature', lambda x: x >= 0, '>= 0 (0 = greedy)'),
            ('top_k', lambda x: (x >= 0) & (x == np.round(x)), 'an int >= 0 (0 = all)'),
            ('top_p', lambda x: (x > 0) & (x <= 1), 'in (0, 1] (1.0 = all)'))
  for name, ok, allowed in limits:
    value = getattr(sampling, name)
    if isinstance(value, jax.core.Tracer):
      continue
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number) or not np.all(ok(array)):
      raise ValueError(f'Sampling.{name}={value!r}: must be {allowed}')


def next_token(logits, sampling, rng):
  """logits: [B, V] float32 -> [B] int32."""
  if isinstance(sampling, Greedy):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not isinstance(sampling, Sampling):
    raise ValueError(f'sampling={sampling!r}; allowed: adaptive_depth.Greedy() or '
                     'adaptive_depth.Sampling(temperature=..., top_k=..., top_p=...)')
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(jnp.asarray(sampling.temperature, jnp.float32), 1e-6)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(vocab)[None, :]
  top_k = jnp.asarray(sampling.top_k)
  keep = jnp.where(top_k > 0, rank < top_k, True)
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  # Keep a token while the mass before it is below top_p (the first token always stays).
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = keep & (mass_before < jnp.asarray(sampling.top_p, jnp.float32))
  choice = jax.random.categorical(rng, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
