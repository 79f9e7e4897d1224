"""The adaptive threshold's state in the generation loop's carry (FREE, Bae et al. 2023).

Under KV policy 'parallel', a token that exits early is queued and later runs its remaining
layers alongside a deep token of its row; its final state then says what the full model
would have predicted. Each exit check a token made (its confidence there, and that exit's
argmax) becomes one labelled observation: agreed = the exit's argmax equals the full model's.
A token that goes all the way labels its checks at once. The observations feed a labelled
two-component Beta mixture (calibrate/beta_mixture.py); every `refit_every` observations the
threshold moves to the lowest grid value from which the posterior probability of agreement
stays at least zeta. Until the first refit the policy's own threshold holds.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import exits
from adaptive_depth.calibrate import beta_mixture

# Candidate thresholds, ascending (the mixture's threshold search reads them low to high).
GRID = tuple(float(t) for t in np.round(np.arange(0.05, 1.0, 0.01), 2))


@flax.struct.dataclass
class Observations:
  """Labelled exit checks of one decode step: confidence, agreed, observed, each [B, K]."""
  confidence: jax.Array
  agreed: jax.Array
  observed: jax.Array


@flax.struct.dataclass
class AdaptiveThreshold:
  """stats: MixtureStats [B, 2] (per_row_statistics) or [2] (shared); threshold: [B], the
  threshold in force; since_refit: observations since the last refit ([B] or [])."""
  stats: beta_mixture.MixtureStats
  threshold: jax.Array
  since_refit: jax.Array

  @classmethod
  def start(cls, policy: exits.ExitPolicy, batch: int) -> 'AdaptiveThreshold':
    shape = (batch,) if policy.per_row_statistics else ()
    return cls(stats=beta_mixture.MixtureStats.empty(shape),
               threshold=jnp.broadcast_to(jnp.asarray(policy.threshold, jnp.float32),
                                          (batch,)),
               since_refit=jnp.zeros(shape, jnp.float32))

  def observe(self, policy: exits.ExitPolicy, seen: Observations) -> 'AdaptiveThreshold':
    """Adds one step's observations; refits where `refit_every` have accumulated."""
    confidence, agreed, observed = seen.confidence, seen.agreed, seen.observed
    if not policy.per_row_statistics:  # one mixture for the batch: pool the rows
      confidence, agreed, observed = (x.reshape(-1) for x in (confidence, agreed, observed))
    stats = self.stats.add(confidence, agreed, observed)
    since = self.since_refit + observed.sum(-1)
    refit = since >= policy.refit_every
    # Fit and grid search only on the steps where some refit is due (most steps have none).
    threshold = jax.lax.cond(
        jnp.any(refit),
        lambda: jnp.where(refit, beta_mixture.adaptive_threshold(
            beta_mixture.fit(stats), GRID, policy.zeta), self.threshold),
        lambda: self.threshold)  # [B] (a shared refit broadcasts)
    return AdaptiveThreshold(stats=stats, threshold=threshold,
                             since_refit=jnp.where(refit, 0.0, since))
