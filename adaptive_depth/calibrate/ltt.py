"""Learn-then-Test (Angelopoulos et al. 2021) with fixed-sequence testing over a threshold grid.

Given per-example risks at every grid threshold, ordered from conservative (full depth or
nearly) to aggressive, test the null "risk > delta" at each threshold in that order, reject
while its p-value is at most epsilon, and stop at the first null that stands. The last
rejected threshold then has risk <= delta with probability >= 1 - epsilon over the draw of
the calibration set (the family-wise error of fixed-sequence testing is at most epsilon,
because the sequence stops at the first true null it meets). No rejection: "none valid",
and decoding stays at full depth.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from adaptive_depth.calibrate import pvalues

# Per-example risks the calibration can control, each in [0, 1]:
#   textual:  1 - token agreement of the early-exit continuation with full depth's;
#   rouge:    1 - ROUGE-L F1 of the two continuations;
#   mismatch: 1 when the continuations differ anywhere, else 0 (exact binomial test);
#   loss:     the early-exit loss on the reference continuation minus full depth's, in nats
#             per token, clipped to [0, 1].
RISKS = ('textual', 'rouge', 'mismatch', 'loss')
BINARY_RISKS = ('mismatch',)


@dataclasses.dataclass(frozen=True)
class TestResult:
  """index: position in the grid of the chosen (last rejected) threshold, or None (none
  valid); p_values / empirical_risk: one per grid threshold ([G]); n: examples."""
  index: Optional[int]
  p_values: np.ndarray
  empirical_risk: np.ndarray
  n: int


def check_level(delta: float, epsilon: float):
  """Raises ValueError naming the argument unless both are in (0, 1)."""
  for name, value in (('delta', delta), ('epsilon', epsilon)):
    if not (isinstance(value, (int, float, np.floating)) and 0.0 < value < 1.0):
      raise ValueError(f'{name}={value!r}: must be in (0, 1)')


def check_risk(risk: str):
  if risk not in RISKS:
    raise ValueError(f'risk={risk!r}; allowed: {", ".join(RISKS)}')


def fixed_sequence_test(risks, delta: float, epsilon: float, binary: bool) -> TestResult:
  """risks: [n, G] per-example risks in [0, 1], grid columns from conservative to aggressive.
  binary: the risks are 0/1 (exact binomial p-values), else Hoeffding-Bentkus."""
  check_level(delta, epsilon)
  risks = np.asarray(risks, np.float64)
  if risks.ndim != 2 or not risks.shape[0]:
    raise ValueError(f'risks: expected [examples, thresholds] with examples >= 1, got shape '
                     f'{risks.shape}')
  if risks.min() < 0 or risks.max() > 1:
    raise ValueError(f'risks must lie in [0, 1]; got [{risks.min():g}, {risks.max():g}]')
  n = risks.shape[0]
  empirical = risks.mean(axis=0)
  pvalue = pvalues.binomial_pvalue if binary else pvalues.hoeffding_bentkus_pvalue
  p = pvalue(empirical, n, delta)
  rejected = np.cumprod(p <= epsilon).astype(bool)  # stays True until the first stand
  index = int(rejected.sum()) - 1 if rejected.any() else None
  return TestResult(index=index, p_values=p, empirical_risk=empirical, n=n)


def fixed_sequence_index(risks, delta: float, epsilon: float, binary: bool,
                         rows: np.ndarray) -> np.ndarray:
  """The chosen grid index for many calibration sets at once (-1 = none valid).

  risks: [N, G] pool; rows: [S, n] indices of S calibration sets of n examples each.
  """
  risks = np.asarray(risks, np.float64)
  n = rows.shape[1]
  empirical = risks[rows].mean(axis=1)  # [S, G]
  pvalue = pvalues.binomial_pvalue if binary else pvalues.hoeffding_bentkus_pvalue
  rejected = np.cumprod(pvalue(empirical, n, delta) <= epsilon, axis=1)
  return rejected.sum(axis=1) - 1
