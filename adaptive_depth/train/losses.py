"""Multi-exit language-modelling loss."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def exit_loss_weights(kind: str, exit_depths: Sequence[int]) -> np.ndarray:
  """Per-exit weights summing to 1.

  uniform: equal; linear: CALM's w_i = d_i / sum_j d_j (deeper exits weigh more);
  last: only the deepest exit (a plain LM loss; the other exits are only monitored).
  """
  depths = np.asarray(exit_depths, dtype=np.float64)
  if kind == 'uniform':
    w = np.ones_like(depths)
  elif kind == 'linear':
    w = depths
  elif kind == 'last':
    w = np.zeros_like(depths)
    w[-1] = 1.0
  else:
    raise ValueError(f"config.train.exit_loss_weights={kind!r}; allowed: uniform, linear, last")
  return (w / w.sum()).astype(np.float32)


def per_exit_token_losses(logits, targets):
  """Cross entropy and argmax correctness per exit and token.

  logits: [E, B, T, V] float32; targets: [B, T] int.
  Returns (nll [E, B, T], correct [E, B, T] float32).
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[None, ..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets[None]).astype(jnp.float32)
  return nll, correct


def multi_exit_loss(logits, targets, weights, kind: str = 'lm'):
  """Weighted sum over exits of a per-exit loss.

  kind 'lm': each exit's mean token cross entropy on the targets. kind 'distill': each
  early exit's mean KL(p_last || p_exit) with the last exit's distribution held fixed
  (stop_gradient), which trains the early exits to agree with full depth rather than with
  the corpus; the last exit keeps its cross entropy. kind 'lm_distill': both for each early
  exit (its cross entropy plus that KL): the exits learn the corpus and also to agree with
  full depth, which lets them leave earlier at the same agreement.
  logits: [E, B, T, V]; targets: [B, T]; weights: [E].
  Returns (scalar loss, per-exit mean cross entropy [E] and accuracy [E]; both reported
  whatever the kind).
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[None, ..., None], axis=-1)[..., 0]
  per_exit = nll.mean(axis=(1, 2))
  accuracy = (jnp.argmax(logits, axis=-1) == targets[None]).astype(jnp.float32).mean(
      axis=(1, 2))
  if kind == 'lm':
    objective = per_exit
  elif kind in ('distill', 'lm_distill'):
    teacher = jax.lax.stop_gradient(log_probs[-1])
    kl = jnp.sum(jnp.exp(teacher) * (teacher - log_probs[:-1]), axis=-1).mean(axis=(1, 2))
    if kind == 'lm_distill':
      kl = kl + per_exit[:-1]
    objective = jnp.concatenate([kl, per_exit[-1:]])
  else:
    raise ValueError(f"config.train.exit_loss={kind!r}; allowed: lm, distill, lm_distill")
  return jnp.dot(jnp.asarray(weights), objective), per_exit, accuracy
