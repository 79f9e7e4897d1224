"""timing.median_with_interval against what is known of the median's sampling spread."""
import numpy as np
import pytest

from adaptive_depth import timing


def test_interval_of_a_normal_sample_matches_the_median_standard_error():
  """For n draws of N(0, 1) the sample median's standard error is sqrt(pi / 2) / sqrt(n)
  (asymptotically): a 95% interval about 2 * 1.96 of it wide, holding the true median 0."""
  n = 401
  values = np.random.default_rng(1).standard_normal(n)
  stats = timing.median_with_interval(values)
  assert stats['median'] == np.median(values) and stats['rounds'] == n
  assert stats['low'] < 0.0 < stats['high']
  expected_width = 2 * 1.96 * np.sqrt(np.pi / 2) / np.sqrt(n)
  assert 0.75 * expected_width < stats['high'] - stats['low'] < 1.25 * expected_width


def test_interval_of_identical_rounds_is_a_point_and_narrows_with_more_rounds():
  assert timing.median_with_interval([1.25] * 7) == {
      'median': 1.25, 'low': 1.25, 'high': 1.25, 'level': 0.95, 'rounds': 7}
  rng = np.random.default_rng(0)
  width = lambda n: (lambda s: s['high'] - s['low'])(
      timing.median_with_interval(1.0 + 0.05 * rng.standard_normal(n)))
  assert width(400) < width(25)


def test_interval_is_reproducible_and_refuses_bad_input():
  values = np.random.default_rng(2).standard_normal(15)
  assert timing.median_with_interval(values) == timing.median_with_interval(values)
  with pytest.raises(ValueError, match='per_round is empty'):
    timing.median_with_interval([])
  with pytest.raises(ValueError, match='must be finite'):
    timing.median_with_interval([1.0, np.nan])
  with pytest.raises(ValueError, match=r'level=1\.5'):
    timing.median_with_interval([1.0], level=1.5)
  with pytest.raises(ValueError, match='resamples=0'):
    timing.median_with_interval([1.0], resamples=0)


def test_interval_text():
  stats = {'median': 1.0234, 'low': 0.98, 'high': 1.051, 'level': 0.95, 'rounds': 12}
  assert timing.interval_text(stats) == '1.02 (95% interval 0.98 to 1.05, 12 rounds)'
  assert timing.interval_text(stats, '{:+.1%}') == ('+102.3% (95% interval +98.0% to '
                                                    '+105.1%, 12 rounds)')
