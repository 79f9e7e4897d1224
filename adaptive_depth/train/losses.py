"""Multi-exit language-modelling loss."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The kinds of multi_exit_loss (config.train.exit_loss).
KINDS = ('lm', 'distill', 'lm_distill', 'lm_steady')


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


def _log_probs_nll_correct(logits, targets):
  """logits: [E, ..., V]; targets: [...] int -> (log-probabilities [E, ..., V], cross
  entropy [E, ...], argmax correct [E, ...] float32).

  A token counts as correct when its target's logit is the row's maximum: argmax == target
  except where the maximum is tied (then any tied target counts). jnp.argmax is a
  (value, index) reduction that XLA's CPU backend does not vectorise (about 2% of the
  quickstart step); a plain row maximum is vectorised.
  """
  targets = jnp.broadcast_to(targets[None], logits.shape[:-1])
  target_logit = _target_logit(logits, targets)
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return jax.nn.log_softmax(logits, axis=-1), cross_entropy(logits, targets), correct


def _target_logit(logits, targets):
  """logits: [..., V]; targets: [...] int -> each target's logit [...]."""
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _cross_entropy_and_probs(logits, targets):
  """logits: [..., V]; targets: [...] int -> (cross entropy [...], softmax [..., V])."""
  with jax.named_scope('cross_entropy'):  # the train profile's parts find the loss by it
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exps = jnp.exp(logits - top)
    sums = jnp.sum(exps, axis=-1, keepdims=True)
    return (top + jnp.log(sums))[..., 0] - _target_logit(logits, targets), exps / sums


@jax.custom_jvp
def cross_entropy(logits, targets):
  """-log softmax(logits)[target]. logits: [..., V]; targets: [...] int -> [...].

  Its derivative is given as softmax(logits) . d_logits - d_logits[target], which reverse
  mode transposes to softmax(logits) - one_hot(target) per unit of gradient: one pass over
  the logits, where autodiff through log_softmax and the target's pick made several (the
  quickstart train step 1.02x on the 2-core CPU; README, Scale). Forward mode works.
  """
  return _cross_entropy_and_probs(logits, targets)[0]


@cross_entropy.defjvp
def _cross_entropy_jvp(primals, tangents):
  logits, targets = primals
  nll, probs = _cross_entropy_and_probs(logits, targets)
  d_logits = tangents[0]
  with jax.named_scope('cross_entropy'):  # its transpose is the loss's backward pass
    return nll, jnp.sum(probs * d_logits, axis=-1) - _target_logit(d_logits, targets)


def per_exit_token_losses(logits, targets):
  """Cross entropy and argmax correctness per exit and token.

  logits: [E, B, T, V] float32; targets: [B, T] int.
  Returns (nll [E, B, T], correct [E, B, T] float32).
  """
  return _log_probs_nll_correct(logits, targets)[1:]


def _token_terms(logits, targets, kind: str):
  """Per exit and token: (objective, cross entropy, argmax correct), each [E, ...].
  logits: [E, ..., V]; targets: [...]. The objectives of multi_exit_loss's kinds."""
  log_probs, nll, correct = _log_probs_nll_correct(logits, targets)
  if kind == 'lm':
    return nll, nll, correct
  if kind in ('distill', 'lm_distill'):
    teacher = jax.lax.stop_gradient(log_probs[-1])
    kl = jnp.sum(jnp.exp(teacher) * (teacher - log_probs[:-1]), axis=-1)
    if kind == 'lm_distill':
      kl = kl + nll[:-1]
    return jnp.concatenate([kl, nll[-1:]]), nll, correct
  if kind == 'lm_steady':
    previous = jax.lax.stop_gradient(log_probs[:-1])
    kl = jnp.sum(jnp.exp(previous) * (previous - log_probs[1:]), axis=-1)
    return jnp.concatenate([nll[:1], nll[1:] + kl]), nll, correct
  raise ValueError(f'config.train.exit_loss={kind!r}; allowed: {", ".join(KINDS)}')


def multi_exit_loss(logits, targets, weights, kind: str = 'lm'):
  """Weighted sum over exits of a per-exit loss.

  kind 'lm': each exit's mean token cross entropy on the targets. kind 'distill': each
  early exit's mean KL(p_last || p_exit) with the last exit's distribution held fixed
  (stop_gradient), which trains the early exits to agree with full depth rather than with
  the corpus; the last exit keeps its cross entropy. kind 'lm_distill': both for each early
  exit (its cross entropy plus that KL): the exits learn the corpus and also to agree with
  full depth, which lets them leave earlier at the same agreement. kind 'lm_steady': every
  exit's cross entropy, plus for each exit after the first its KL(p_previous || p_exit) with
  the previous exit's distribution held fixed: it penalises changes from the previous exit
  that the corpus does not pay for (aimed at looped blocks, whose deep steps otherwise keep
  moving the prediction; docs/engine_benchmark_history.md, What holds the exits back, has
  what it did).
  logits: [E, B, T, V]; targets: [B, T]; weights: [E].
  Returns (scalar loss, per-exit mean cross entropy [E] and accuracy [E]; both reported
  whatever the kind).
  """
  objective, nll, correct = _token_terms(logits, targets, kind)
  mean = lambda x: x.mean(axis=(1, 2))
  return jnp.dot(jnp.asarray(weights), mean(objective)), mean(nll), mean(correct)


def chunk_length(seq_len: int, chunk_tokens: int) -> int:
  """The largest divisor of seq_len that is at most chunk_tokens (shapes stay static)."""
  return max(c for c in range(1, min(seq_len, chunk_tokens) + 1) if seq_len % c == 0)


def chunked_multi_exit_loss(head_logits, exit_states, targets, weights, kind: str = 'lm',
                            chunk_tokens: int = 128):
  """multi_exit_loss without the [E, B, T, V] logits: a scan over chunks of positions,
  each computing every exit's logits for its chunk ([E, B, c, V]) inside jax.checkpoint, so
  neither the forward nor the gradient holds more than one chunk's logits (the backward
  recomputes them chunk by chunk). For large vocabularies (SmolLM2: V = 49152).

  head_logits: [E, B, c, D] -> [E, B, c, V] (every exit's head); exit_states: [E, B, T, D];
  targets: [B, T]; weights: [E]; chunk_tokens: positions per chunk (the largest divisor of
  T not above it). Returns what multi_exit_loss returns.
  """
  num_exits, batch, seq_len, width = exit_states.shape
  chunk = chunk_length(seq_len, chunk_tokens)
  count = seq_len // chunk
  states = exit_states.reshape(num_exits, batch, count, chunk, width).transpose(2, 0, 1, 3, 4)
  chunk_targets = targets.reshape(batch, count, chunk).transpose(1, 0, 2)

  @jax.checkpoint
  def chunk_sums(h, t):  # [E, B, c, D], [B, c] -> three [E] sums over the chunk's tokens
    terms = _token_terms(head_logits(h), t, kind)
    return tuple(x.sum(axis=(1, 2)) for x in terms)

  def body(totals, xs):
    return tuple(a + b for a, b in zip(totals, chunk_sums(*xs))), None

  zeros = jnp.zeros((num_exits,), jnp.float32)
  (objective, nll, correct), _ = jax.lax.scan(body, (zeros, zeros, zeros),
                                              (states, chunk_targets))
  tokens = batch * seq_len
  return jnp.dot(jnp.asarray(weights), objective / tokens), nll / tokens, correct / tokens
