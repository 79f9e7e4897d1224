"""FREE's (Bae et al. 2023) labelled two-component Beta mixture over exit confidences.

Each observation is an exit confidence c in (0, 1) and a label: whether the deep model agreed
with the shallow prediction. Component 1 holds the confidences of agreeing tokens, component
0 the rest, each Beta(alpha_k, beta_k); the mixing weight is P(agree). Labels are observed,
so the fit is per component, by the method of moments on running sufficient statistics
(count, sum c, sum c^2): the state is O(1) and can ride in a decode loop's carry, and a refit
is a handful of scalar operations on device. The exit threshold is then the lowest grid value
from which the posterior probability of agreement stays at least zeta.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

_EDGE = 1e-4  # confidences are clipped into [EDGE, 1 - EDGE] (a Beta density needs (0, 1))


@flax.struct.dataclass
class MixtureStats:
  """Running sums per component (index 0: disagreed, 1: agreed), shape [..., 2] each, so a
  leading batch axis gives every row its own statistics."""
  count: jax.Array
  total: jax.Array
  total_sq: jax.Array

  @classmethod
  def empty(cls, shape=()) -> 'MixtureStats':
    zeros = jnp.zeros(tuple(shape) + (2,), jnp.float32)
    return cls(count=zeros, total=zeros, total_sq=zeros)

  def add(self, confidence, agreed, observed) -> 'MixtureStats':
    """Adds observations [..., N] (confidence float, agreed bool, observed bool: which of
    the N slots hold an observation) to statistics of shape [..., 2]."""
    c = jnp.clip(confidence.astype(jnp.float32), _EDGE, 1 - _EDGE)
    onehot = jax.nn.one_hot(agreed.astype(jnp.int32), 2) * observed[..., None]  # [..., N, 2]
    return MixtureStats(count=self.count + onehot.sum(-2),
                        total=self.total + (onehot * c[..., None]).sum(-2),
                        total_sq=self.total_sq + (onehot * (c * c)[..., None]).sum(-2))


@flax.struct.dataclass
class BetaMixture:
  """weight: P(agree) [...]; alpha, beta: [..., 2] (component 0: disagreed, 1: agreed)."""
  weight: jax.Array
  alpha: jax.Array
  beta: jax.Array


def fit(stats: MixtureStats, prior_count: float = 1.0) -> BetaMixture:
  """Method-of-moments fit per component: with mean m and variance v,
  alpha = m k, beta = (1 - m) k, k = m (1 - m) / v - 1. A component with fewer than two
  observations (or no spread) falls back towards Beta(1, 1): `prior_count` pseudo-samples of
  a uniform are added to every component's statistics (mean 1/2, second moment 1/3)."""
  count = stats.count + prior_count
  mean = (stats.total + prior_count / 2) / count
  second = (stats.total_sq + prior_count / 3) / count
  variance = jnp.maximum(second - mean * mean, 1e-6)
  k = jnp.maximum(mean * (1 - mean) / variance - 1, 1e-3)
  weight = count[..., 1] / count.sum(-1)
  return BetaMixture(weight=weight, alpha=mean * k, beta=(1 - mean) * k)


def _log_beta_pdf(c, a, b):
  return ((a - 1) * jnp.log(c) + (b - 1) * jnp.log1p(-c)
          - (jax.lax.lgamma(a) + jax.lax.lgamma(b) - jax.lax.lgamma(a + b)))


def agreement_posterior(mixture: BetaMixture, confidence):
  """P(agree | confidence). mixture [...]; confidence [..., N] -> [..., N]."""
  c = jnp.clip(jnp.asarray(confidence, jnp.float32), _EDGE, 1 - _EDGE)
  expand = lambda x: x[..., None]
  agree = jnp.log(expand(mixture.weight)) + _log_beta_pdf(
      c, expand(mixture.alpha[..., 1]), expand(mixture.beta[..., 1]))
  disagree = jnp.log1p(-expand(mixture.weight)) + _log_beta_pdf(
      c, expand(mixture.alpha[..., 0]), expand(mixture.beta[..., 0]))
  return jax.nn.sigmoid(agree - disagree)


def adaptive_threshold(mixture: BetaMixture, grid, zeta):
  """The lowest value of `grid` ([G], ascending) from which the posterior of agreement is at
  least zeta at every grid value above; +inf (never exit) when even the top fails.

  Contiguity from the top, not merely the lowest passing value: a mixture fitted to few
  disagreeing samples can dip and rise again at low confidence, and a threshold there would
  also admit the failing values between."""
  grid = jnp.asarray(grid, jnp.float32)
  passes = agreement_posterior(mixture, jnp.broadcast_to(grid, mixture.weight.shape +
                                                          grid.shape)) >= zeta
  from_top = jnp.flip(jnp.cumprod(jnp.flip(passes, -1).astype(jnp.int32), -1), -1)
  first = jnp.argmax(from_top, axis=-1)
  return jnp.where(from_top.any(-1), grid[first], jnp.inf)
