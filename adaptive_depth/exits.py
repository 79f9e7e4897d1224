"""Exit policies: confidence measures, threshold schedules, the learned exit classifier.

A confidence measure maps an exit's logits (and hidden state) to one score per token;
a token exits when its score reaches the threshold. Thresholds, tau and the minimum exit
depth are traced values in `ExitPolicy`, so sweeping them reuses one compiled program; the
measure's name and the schedule kind are static (they change the program).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MEASURES = ('softmax_diff', 'softmax_diff_approx', 'max_prob', 'neg_entropy', 'saturation',
            'classifier', 'oracle', 'never', 'router')
# Mixture-of-Recursions models decide with their routers (threshold: expert-choice's sigmoid
# threshold) or run every recursion ('never'); early-exit models use the others.
ROUTED_MEASURES = ('router', 'never')
SCHEDULES = ('constant', 'decaying', 'adaptive')
# Measures the adaptive schedule can fit a Beta mixture to: in [0, 1], and read the exit head
# (whose argmax is what the deep model agrees with or not).
ADAPTIVE_MEASURES = ('max_prob', 'softmax_diff', 'softmax_diff_approx')


@flax.struct.dataclass
class ExitPolicy:
  """When a token leaves the depth loop.

  measure: one of MEASURES ('never' runs full depth; 'oracle' exits at the first depth whose
    argmax equals the full model's, for analysis; 'router': a Mixture-of-Recursions model's
    routers decide, threshold being expert-choice's sigmoid threshold).
  threshold: exit when confidence >= threshold (traced).
  min_depth: no exit before this depth (traced).
  schedule: 'constant', or 'decaying' (CALM):
    threshold_t = clip(0.9 * threshold + 0.1 * exp(-tau * t / max_len), 0, 1),
    with t the token's position in its own row (generation: its index among new tokens);
    or 'adaptive' (FREE): `threshold` is only the starting value; decoding with kv='parallel'
    fits a labelled Beta mixture to (exit confidence, did the full model agree) pairs as
    queued tokens catch up, and every `refit_every` observations moves the threshold to the
    lowest grid value whose posterior probability of agreement is at least `zeta`
    (decode/adaptive_threshold.py). Measures: ADAPTIVE_MEASURES.
  zeta: the adaptive schedule's target posterior probability of agreement (traced).
  refit_every: observations between refits (static). per_row_statistics: each row fits its
    own mixture, else the rows share one (static).
  exit_at: for analysis, force every token out at exactly this depth, whatever the measure
    and min_depth; one of the model's exit depths, or 0 = off (traced).
  """
  measure: str = flax.struct.field(pytree_node=False, default='softmax_diff')
  schedule: str = flax.struct.field(pytree_node=False, default='constant')
  threshold: Any = 0.9
  min_depth: Any = 1
  tau: Any = 4.0
  max_len: Any = 128
  exit_at: Any = 0
  zeta: Any = 0.9
  refit_every: int = flax.struct.field(pytree_node=False, default=16)
  per_row_statistics: bool = flax.struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    # Fixed dtypes for concrete values, so that 0.9, np.float64(0.9) and 1 all hit the same
    # compiled program (jit keys on dtype and weak type). Tracers pass through untouched.
    for name, dtype in (('threshold', np.float32), ('tau', np.float32),
                        ('max_len', np.float32), ('min_depth', np.int32),
                        ('exit_at', np.int32), ('zeta', np.float32)):
      value = getattr(self, name)
      if isinstance(value, (int, float, np.number, np.ndarray, list)):
        object.__setattr__(self, name, np.asarray(value, dtype))

  def validated(self, exit_depths=None) -> 'ExitPolicy':
    """Raises ValueError naming the field. exit_depths: the model's exit depths; with them
    a concrete exit_at must be 0 or one of them (a traced exit_at cannot be checked)."""
    if self.measure not in MEASURES:
      raise ValueError(f'ExitPolicy.measure={self.measure!r}; allowed: {", ".join(MEASURES)}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'ExitPolicy.schedule={self.schedule!r}; allowed: {", ".join(SCHEDULES)}')
    if self.schedule == 'adaptive' and self.measure not in ADAPTIVE_MEASURES + ('never',):
      raise ValueError(f"ExitPolicy.schedule='adaptive' fits a Beta mixture to confidences in "
                       f'[0, 1] read from the exit head; measure={self.measure!r} is not one; '
                       f'allowed: {", ".join(ADAPTIVE_MEASURES)}')
    if not isinstance(self.refit_every, int) or self.refit_every < 1:
      raise ValueError(f'ExitPolicy.refit_every={self.refit_every!r}: must be an int >= 1')
    zeta = _concrete(self.zeta)
    if zeta is not None and not np.all((zeta > 0) & (zeta < 1)):
      raise ValueError(f'ExitPolicy.zeta={zeta}: must be in (0, 1)')
    exit_at = _concrete(self.exit_at)
    if exit_depths is not None and exit_at is not None:
      allowed = [int(d) for d in exit_depths]
      bad = sorted({int(d) for d in np.ravel(exit_at) if d != 0 and d not in allowed})
      if bad:
        raise ValueError(f'ExitPolicy.exit_at={bad[0]} is not an exit of this model; allowed: '
                         f'0 (off) or one of its exit depths {allowed} '
                         '(config.model.exit_layers)')
    return self


def _concrete(value):
  """value as a numpy array, or None when it is traced (known only when the program runs)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def threshold_at(policy: ExitPolicy, t):
  """Threshold for tokens at row position t ([B, T] int) -> [B, T] float32."""
  base = jnp.asarray(policy.threshold, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  if policy.schedule != 'decaying':  # 'adaptive': the decode loop sets the threshold
    return jnp.broadcast_to(base, t.shape)
  decay = jnp.exp(-jnp.asarray(policy.tau, jnp.float32) * t /
                  jnp.asarray(policy.max_len, jnp.float32))
  return jnp.clip(0.9 * base + 0.1 * decay, 0.0, 1.0)


def top2_probs(logits, approx: bool = False):
  """(top-1, top-2) softmax probabilities, [..., V] -> two [...] arrays.

  approx=True uses `lax.approx_max_k`, which on TPU avoids a full sort of a large vocabulary
  (on CPU it is exact).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  top = (jax.lax.approx_max_k(logits, 2)[0] if approx else jax.lax.top_k(logits, 2)[0])
  probs = jnp.exp(top - log_z[..., None])
  return probs[..., 0], probs[..., 1]


def softmax_diff(logits, approx=False):
  """Top-1 minus top-2 probability. [..., V] -> [...]."""
  first, second = top2_probs(logits, approx)
  return first - second


def max_prob(logits):
  """Largest softmax probability. [..., V] -> [...]."""
  return jnp.exp(jnp.max(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1))


def neg_entropy(logits):
  """Minus the entropy of the softmax, in nats (0 = certain). [..., V] -> [...]."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def saturation(h, h_previous):
  """Cosine similarity of a token's state with its state at the previous exit.

  h, h_previous: [..., D] -> [...]. High when the layers in between changed little.
  """
  h = h.astype(jnp.float32)
  h_previous = h_previous.astype(jnp.float32)
  dot = jnp.sum(h * h_previous, axis=-1)
  norms = jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(h_previous, axis=-1)
  return dot / jnp.maximum(norms, 1e-6)


# --- learned exit classifier ------------------------------------------------------------

def classifier_features(logits, h_normed, depth_index, num_exits: int):
  """Inputs of the exit classifier: the normed hidden state, cheap statistics of the exit
  distribution (max prob, top-1 minus top-2, negative entropy) and a one-hot of the exit.

  logits: [..., V]; h_normed: [..., D]; depth_index: int (exit number). -> [..., D + 3 + E].
  """
  first, second = top2_probs(logits)
  stats = jnp.stack([first, first - second, neg_entropy(logits)], axis=-1)
  onehot = jnp.broadcast_to(jax.nn.one_hot(depth_index, num_exits), stats.shape[:-1] +
                            (num_exits,))
  return jnp.concatenate([h_normed.astype(jnp.float32), stats, onehot], axis=-1)


def init_classifier(rng, feature_dim: int, hidden: int = 64) -> dict:
  """A one-hidden-layer MLP: features [..., F] -> logit of 'this exit agrees'."""
  k1, k2 = jax.random.split(rng)
  return {'w1': jax.random.normal(k1, (feature_dim, hidden)) / jnp.sqrt(feature_dim),
          'b1': jnp.zeros((hidden,)),
          'w2': jax.random.normal(k2, (hidden,)) / jnp.sqrt(hidden),
          'b2': jnp.zeros(())}


def classifier_logit(classifier_params, features):
  """[..., F] -> [...] logit."""
  p = classifier_params
  hidden = jax.nn.gelu(features @ p['w1'] + p['b1'])
  return hidden @ p['w2'] + p['b2']


def classifier_confidence(classifier_params, features):
  """Probability that this exit's argmax equals the final exit's. [..., F] -> [...]."""
  return jax.nn.sigmoid(classifier_logit(classifier_params, features))
