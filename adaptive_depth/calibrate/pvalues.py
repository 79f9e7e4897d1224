"""p-values for the null "the risk at this threshold exceeds delta", from n i.i.d. per-example
risks in [0, 1] with empirical mean `risk_hat`.

  - `binomial_pvalue`: exact, for 0/1 risks. The number of failures K = n * risk_hat is
    Binomial(n, R); under the null R > delta it is stochastically at least Binomial(n, delta),
    so p = P(Binomial(n, delta) <= K) is valid.
  - `hoeffding_bentkus_pvalue`: for risks bounded in [0, 1] (Bates et al. 2021, eq. 10-11):
      Hoeffding  p_H = exp(-n * h(min(risk_hat, delta), delta)),
                 h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b));
      Bentkus    p_B = e * P(Binomial(n, delta) <= ceil(n * risk_hat));
      p_HB = min(p_H, p_B).

All functions take numpy arrays of risk_hat (any shape) and return p-values of that shape.
The binomial distribution is computed here (log-space pmf, cumulative sum), so the library
does not need scipy; the tests compare it with scipy's.
"""
from __future__ import annotations

import math

import numpy as np


def binomial_cdf(k, n: int, p: float) -> np.ndarray:
  """P(Binomial(n, p) <= k) for integer array k (k < 0 gives 0, k >= n gives 1)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f'binomial_cdf: p={p} must be in (0, 1)')
  i = np.arange(n + 1)
  log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
  log_pmf = (log_factorial[n] - log_factorial[i] - log_factorial[n - i] +
             i * math.log(p) + (n - i) * math.log1p(-p))
  cdf = np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)
  k = np.asarray(k)
  return np.where(k < 0, 0.0, cdf[np.clip(k, 0, n)])


def binomial_pvalue(risk_hat, n: int, delta: float) -> np.ndarray:
  """Exact p-value for 0/1 risks: P(Binomial(n, delta) <= n * risk_hat)."""
  failures = np.rint(np.asarray(risk_hat, np.float64) * n).astype(np.int64)
  return binomial_cdf(failures, n, delta)


def hoeffding_pvalue(risk_hat, n: int, delta: float) -> np.ndarray:
  """exp(-n h(min(risk_hat, delta), delta)); 1 when risk_hat >= delta."""
  a = np.minimum(np.asarray(risk_hat, np.float64), delta)
  with np.errstate(divide='ignore', invalid='ignore'):
    # a log(a / delta) -> 0 as a -> 0.
    first = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / delta), 0.0)
    second = (1 - a) * np.log((1 - a) / (1 - delta))
  return np.minimum(np.exp(-n * (first + second)), 1.0)


def bentkus_pvalue(risk_hat, n: int, delta: float) -> np.ndarray:
  """e * P(Binomial(n, delta) <= ceil(n * risk_hat)), capped at 1."""
  # The small tolerance keeps n * risk_hat = 3.0000000001 (float noise) at 3.
  failures = np.ceil(np.asarray(risk_hat, np.float64) * n - 1e-9).astype(np.int64)
  return np.minimum(math.e * binomial_cdf(failures, n, delta), 1.0)


def hoeffding_bentkus_pvalue(risk_hat, n: int, delta: float) -> np.ndarray:
  """min(Hoeffding, Bentkus): valid for any risk bounded in [0, 1]."""
  return np.minimum(hoeffding_pvalue(risk_hat, n, delta), bentkus_pvalue(risk_hat, n, delta))
