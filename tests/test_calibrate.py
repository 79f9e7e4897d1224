"""Learn-then-Test calibration (p-values, fixed-sequence testing, the guarantee on synthetic
risks and on a model's decodes) and the labelled Beta mixture of the adaptive threshold."""
import json
import math
import os

import jax
import numpy as np
import pytest
from scipy import stats

import adaptive_depth as ad
from adaptive_depth import cli
from adaptive_depth.calibrate import beta_mixture
from adaptive_depth.calibrate import calibration_file
from adaptive_depth.calibrate import calibration_run
from adaptive_depth.calibrate import ltt
from adaptive_depth.calibrate import pvalues
from adaptive_depth.decode import api as decode_api
from tests import compile_counter
from tests import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/shared_exit.py:tiny'


def test_binomial_tail_matches_scipy():
  for n, p in ((1, 0.3), (37, 0.05), (500, 0.1), (2000, 0.2)):
    k = np.arange(-1, n + 2)
    np.testing.assert_allclose(pvalues.binomial_cdf(k, n, p), stats.binom.cdf(k, n, p),
                               rtol=1e-9, atol=1e-300)
  risk_hat = np.array([0.0, 0.04, 0.1, 0.3])
  np.testing.assert_allclose(pvalues.binomial_pvalue(risk_hat, 50, 0.1),
                             stats.binom.cdf([0, 2, 5, 15], 50, 0.1), rtol=1e-9)


def test_hoeffding_bentkus_worked_example():
  # n = 100 examples with mean risk 0.05, tested against delta = 0.1:
  #   h(0.05, 0.1) = 0.05 ln(0.05/0.1) + 0.95 ln(0.95/0.9) = 0.0167066...
  #   Hoeffding: exp(-100 * 0.0167066) = 0.18812;
  #   Bentkus: e * P(Binomial(100, 0.1) <= 5) = e * 0.0576 = 0.15651.
  h = 0.05 * math.log(0.5) + 0.95 * math.log(0.95 / 0.9)
  tail = sum(math.comb(100, i) * 0.1 ** i * 0.9 ** (100 - i) for i in range(6))
  assert math.isclose(pvalues.hoeffding_pvalue(0.05, 100, 0.1), math.exp(-100 * h),
                      rel_tol=1e-9)
  assert math.isclose(pvalues.bentkus_pvalue(0.05, 100, 0.1), math.e * tail, rel_tol=1e-9)
  assert round(float(pvalues.hoeffding_pvalue(0.05, 100, 0.1)), 5) == 0.18812
  assert round(float(pvalues.hoeffding_bentkus_pvalue(0.05, 100, 0.1)), 5) == 0.15651
  # At or above delta nothing is evidence against the null.
  assert pvalues.hoeffding_bentkus_pvalue(0.1, 100, 0.1) == 1.0
  # A mean risk of 0 with n = 100: exp(100 ln 0.9) beats e * 0.9^100.
  assert math.isclose(pvalues.hoeffding_bentkus_pvalue(0.0, 100, 0.1), 0.9 ** 100,
                      rel_tol=1e-9)


def test_fixed_sequence_stops_at_the_first_null_that_stands():
  n = 400
  low, high = np.zeros(n), np.ones(n)
  # Columns (conservative -> aggressive): risk 0, 0, 1 (stands), 0 (would reject, unreached).
  risks = np.stack([low, low, high, low], axis=1)
  result = ltt.fixed_sequence_test(risks, delta=0.1, epsilon=0.05, binary=True)
  assert result.index == 1
  assert result.p_values[0] <= 0.05 and result.p_values[2] > 0.05 and result.p_values[3] <= 0.05
  none = ltt.fixed_sequence_test(np.stack([high, low], 1), 0.1, 0.05, binary=True)
  assert none.index is None
  # Too few examples for any threshold to pass is not an error: "none valid". With 10
  # examples and no failure, P(Binomial(10, 0.05) <= 0) = 0.95^10 = 0.60 > epsilon.
  few = ltt.fixed_sequence_test(np.zeros((10, 3)), 0.05, 0.05, binary=True)
  assert few.index is None and math.isclose(few.p_values[0], 0.95 ** 10)
  with pytest.raises(ValueError, match='delta'):
    ltt.fixed_sequence_test(risks, delta=1.5, epsilon=0.05, binary=True)
  with pytest.raises(ValueError, match='epsilon'):
    ltt.fixed_sequence_test(risks, delta=0.1, epsilon=0.0, binary=True)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    ltt.fixed_sequence_test(risks * 2, delta=0.1, epsilon=0.05, binary=True)
  # The batched form agrees with the single test.
  rows = np.arange(n)[None]
  assert ltt.fixed_sequence_index(risks, 0.1, 0.05, True, rows).tolist() == [1]


GRID = np.round(np.linspace(1.0, 0.0, 101), 2)  # conservative -> aggressive


def _synthetic_risks(rng, n: int, binary: bool) -> np.ndarray:
  """Confidence s ~ U(0, 1); at threshold t an example exits when s >= t. Binary: then it is
  wrong with probability 1 - s; bounded: its risk is 1 - s. Either way the true risk is
  R(t) = integral_t^1 (1 - s) ds = (1 - t)^2 / 2, so the oracle threshold for delta is
  1 - sqrt(2 delta)."""
  s, u = rng.uniform(size=n), rng.uniform(size=n)
  wrong = (u > s).astype(float) if binary else 1.0 - s
  return (s[:, None] >= GRID[None]) * wrong[:, None]


@pytest.mark.parametrize('binary', [True, False], ids=['binomial', 'hoeffding_bentkus'])
def test_guarantee_where_the_true_risk_is_known(binary):
  """Over 1,000 calibration sets of 500, the chosen threshold's true risk exceeds delta at
  most epsilon of the time (+3 standard deviations of binomial slack), and the procedure is
  not trivially conservative: the median choice has at least half of the allowed risk and
  lies within 0.1 of the oracle threshold."""
  draws, epsilon = 1000, 0.05
  true_risk = (1 - GRID) ** 2 / 2
  slack = 3 * math.sqrt(draws * epsilon * (1 - epsilon))
  for delta in (0.05, 0.1, 0.2):
    rng = np.random.default_rng(int(delta * 100))
    chosen = np.array([
        ltt.fixed_sequence_test(_synthetic_risks(rng, 500, binary), delta, epsilon,
                                binary).index for _ in range(draws)], dtype=object)
    assert all(c is not None for c in chosen), delta
    chosen = chosen.astype(int)
    # The README's table: python -m pytest -s tests/test_calibrate.py -k true_risk_is_known
    print(f'delta {delta}: oracle {1 - math.sqrt(2 * delta):.3f}, median chosen '
          f'{np.median(GRID[chosen]):.2f}, true risk > delta in '
          f'{(true_risk[chosen] > delta).sum()} of {draws}, median true risk '
          f'{np.median(true_risk[chosen]) / delta:.2f} of delta')
    assert (true_risk[chosen] > delta).sum() <= draws * epsilon + slack, delta
    assert np.median(true_risk[chosen]) >= 0.5 * delta, delta
    assert abs(np.median(GRID[chosen]) - (1 - math.sqrt(2 * delta))) <= 0.1, delta


def test_continuation_risks_against_hand_counts():
  full = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  early = np.array([[1, 2, 3, 4], [6, 7, 9, 9]])
  risks = calibration_run.continuation_risks(early, full)
  np.testing.assert_allclose(risks['textual'], [0.0, 1.0])  # row 2: no position agrees
  np.testing.assert_allclose(risks['mismatch'], [0.0, 1.0])
  # Row 2's longest common subsequence is (6, 7): ROUGE-L F1 = 2 * 2 / (4 + 4) = 0.5.
  np.testing.assert_allclose(risks['rouge'], [0.0, 0.5])


def test_beta_mixture_recovers_known_parameters():
  """20,000 labelled samples of 0.7 Beta(6, 1.5) (agreed) + 0.3 Beta(2, 3): the fit is within
  5% on every shape parameter and 0.02 on the weight, per row and pooled; the threshold at
  zeta = 0.9 is within 0.03 of the one the true mixture gives."""
  rng = np.random.default_rng(0)
  n, weight = 20_000, 0.7
  agreed = rng.uniform(size=n) < weight
  confidence = np.where(agreed, rng.beta(6, 1.5, n), rng.beta(2, 3, n))
  # Each compiled (one program per shape, as a decode loop traces them), not op by op.
  add = jax.jit(lambda stats, *observations: stats.add(*observations))
  fit = jax.jit(beta_mixture.fit)
  threshold_of = jax.jit(beta_mixture.adaptive_threshold)
  pooled = fit(add(beta_mixture.MixtureStats.empty(), confidence, agreed, np.ones(n, bool)))
  per_row = fit(add(beta_mixture.MixtureStats.empty((2,)), confidence.reshape(2, -1),
                    agreed.reshape(2, -1), np.ones((2, n // 2), bool)))
  for fitted in (pooled, per_row):
    np.testing.assert_allclose(fitted.alpha, np.broadcast_to([2, 6], fitted.alpha.shape),
                               rtol=0.05)
    np.testing.assert_allclose(fitted.beta, np.broadcast_to([3, 1.5], fitted.beta.shape),
                               rtol=0.05)
    np.testing.assert_allclose(fitted.weight, weight, atol=0.02)
  grid = np.round(np.linspace(0.01, 0.99, 99), 2)  # the Beta densities are finite inside
  posterior = (weight * stats.beta.pdf(grid, 6, 1.5) /
               (weight * stats.beta.pdf(grid, 6, 1.5) + 0.3 * stats.beta.pdf(grid, 2, 3)))
  true_threshold = grid[np.argmax(posterior >= 0.9)]  # the posterior rises monotonically
  assert abs(float(threshold_of(pooled, grid, 0.9)) - true_threshold) <= 0.03
  # Unobserved slots change nothing; a zeta nothing reaches means never exit.
  masked = add(beta_mixture.MixtureStats.empty(), confidence, agreed, np.arange(n) < 100)
  assert float(np.asarray(masked.count).sum()) == 100
  assert float(threshold_of(pooled, grid, 1.0)) == np.inf


@pytest.fixture(scope='module')
def calibrated(tmp_path_factory):
  """A tiny random model calibrated on a small pool, with the validity check on."""
  workdir = tiny_models.save_workdir(str(tmp_path_factory.mktemp('cal') / 'model'), CONFIG)
  config = ad.load_config(os.path.join(REPO, CONFIG), {
      'calibrate.num_examples': 96, 'calibrate.prompt_len': 8, 'calibrate.new_tokens': 6,
      'calibrate.batch_size': 96})
  lines, compiles_at_line = [], []
  with compile_counter.backend_compiles() as compiles:
    def progress(line):
      lines.append(line)
      compiles_at_line.append(len(compiles))
    result = calibration_run.calibrate_run(config, workdir, measures=['max_prob'],
                                           risk='textual', delta=0.2, epsilon=0.1, splits=40,
                                           deltas=(0.1, 0.2, 0.4), progress=progress)
  return workdir, config, result, list(zip(lines, compiles_at_line))


def test_calibration_file_and_validity_on_decodes(calibrated):
  workdir, _, result, progress = calibrated
  lines = [line for line, _ in progress]
  # One compile serves the whole grid: after the first grid threshold's line, nothing new.
  grid_compiles = [count for line, count in progress if line.startswith('  max_prob ')]
  assert len(grid_compiles) == 20 and len(set(grid_compiles)) == 1, grid_compiles
  saved = json.load(open(os.path.join(workdir, 'calibration.json')))
  entry = saved['measures']['max_prob']
  assert (saved['delta'], saved['epsilon'], saved['risk']) == (0.2, 0.1, 'textual')
  assert entry['n'] == 96 and len(entry['p_values']) == len(entry['grid']) == 20
  assert entry['grid'][0] == 1.0  # the most conservative threshold is tested first
  # The choice is the last threshold before the first p-value above epsilon.
  p = np.asarray(entry['p_values'])
  stands = np.flatnonzero(p > 0.1)
  expected = (len(p) if not stands.size else stands[0]) - 1
  assert entry['threshold'] == (None if expected < 0 else entry['grid'][expected])
  assert entry['valid']  # this pool passes at least the thresholds that never exit
  assert entry['empirical_risk'] == entry['grid_empirical_risk'][expected]
  assert entry['empirical_risk'] <= 0.2
  # The threshold 1.0 exits nothing, so its continuations equal full depth's: risk 0.
  assert entry['grid_empirical_risk'][0] == 0.0
  # The smaller version of the validity experiment: the guarantee holds at each delta.
  assert [r['delta'] for r in result['validity']] == [0.1, 0.2, 0.4]
  # Not vacuous: the aggressive end of the grid carries risk above every delta tested, so
  # the choice is a real trade-off, and at least the loosest delta exits below 1.0.
  assert max(entry['grid_empirical_risk']) > 0.4, entry['grid_empirical_risk']
  for row in result['validity']:
    assert row['allowed'] == math.ceil(0.1 * 40) + 4  # epsilon of the splits + 4 slack
    assert row['exceed'] <= row['allowed'], row
    assert row['calibration_examples'] == row['test_examples'] == 48
  loosest = result['validity'][-1]
  assert loosest['threshold_median'] is not None and loosest['threshold_median'] < 1.0
  assert any('| delta |' in line for line in lines)
  assert os.path.isfile(os.path.join(workdir, 'calibration_validity.json'))


def test_threshold_calibrated_reads_the_file(calibrated, tmp_path):
  workdir, config, result, _ = calibrated
  model = ad.load(workdir)
  prompts = [[1, 2, 3, 4], [5, 6, 7]]
  chosen = result['measures']['max_prob']['threshold']
  path = os.path.join(workdir, 'calibration.json')
  original = open(path).read()
  for threshold in (0.5, None):  # a valid threshold, then "none valid"
    saved = json.loads(original)
    saved['measures']['max_prob']['threshold'] = threshold
    with open(path, 'w') as f:
      json.dump(saved, f)
    overrides = {'generate.measure': 'max_prob', 'generate.threshold': 'calibrated',
                 'generate.max_new_tokens': 8}
    out = decode_api.generate_from_config(
        model, prompts, ad.load_config(os.path.join(REPO, CONFIG), overrides), workdir=workdir)
    explicit = ad.generate(model, prompts, max_new_tokens=8, exit=ad.ExitPolicy(
        measure='max_prob' if threshold else 'never', threshold=threshold or 1.0))
    assert out.tokens == explicit.tokens and out.exit_depths == explicit.exit_depths
  with open(path, 'w') as f:  # the other tests read the calibration as it was written
    f.write(original)
  assert chosen is None or 0 < chosen <= 1
  with pytest.raises(cli.UserError, match='calibration.json'):
    decode_api.generate_from_config(model, prompts, ad.load_config(
        os.path.join(REPO, CONFIG), {'generate.measure': 'max_prob',
                                     'generate.threshold': 'calibrated'}),
        workdir=str(tmp_path))
  # The guarantee is for the decoder and the checkpoint it calibrated.
  with pytest.raises(cli.UserError, match="calibrate.kv=parallel"):
    calibration_file.calibrated_threshold(workdir, 'max_prob', kv='parallel')
  with pytest.raises(cli.UserError, match='step 7'):
    calibration_file.calibrated_threshold(workdir, 'max_prob', model_step=7)
  # Without a step, the latest checkpoint on disk is the model every entry point loads:
  # a retrained workdir (a newer checkpoint folder) is refused too (evaluate, benchmark).
  saved_step = json.load(open(os.path.join(workdir, 'calibration.json')))['step']
  newer = os.path.join(workdir, 'checkpoints', str(saved_step + 100))
  os.makedirs(newer)
  try:
    with pytest.raises(cli.UserError, match=f'step {saved_step + 100}'):
      calibration_file.calibrated_threshold(workdir, 'max_prob')
  finally:
    os.rmdir(newer)
  with pytest.raises(cli.UserError, match="no threshold for measure 'softmax_diff'"):
    calibration_file.calibrated_threshold(workdir, 'softmax_diff')


def test_evaluate_and_benchmark_read_the_calibrated_threshold(calibrated):
  workdir, _, result, _ = calibrated
  config = ad.load_config(os.path.join(REPO, CONFIG), {
      'generate.measure': 'max_prob', 'generate.threshold': 'calibrated'})
  said = []
  chosen = result['measures']['max_prob']['threshold']
  assert calibration_file.resolve_thresholds(config, workdir, 'max_prob', [0.3, 0.5],
                                            said.append) == [chosen]
  assert 'calibration.json' in said[0] and 'delta 0.2' in said[0]
  plain = ad.load_config(os.path.join(REPO, CONFIG))
  assert calibration_file.resolve_thresholds(plain, workdir, 'max_prob', [0.3, 0.5]) == [0.3, 0.5]
  evaluated = ad.evaluate_run(config, workdir, measures=['max_prob'], num_batches=1)
  entry = evaluated['calibrated']
  assert entry['threshold'] == chosen and entry['measure'] == 'max_prob'
  assert entry['source'] == os.path.join(workdir, 'calibration.json')


def test_bad_arguments_are_refused_before_loading(tmp_path):
  config = ad.load_config(os.path.join(REPO, CONFIG))
  missing = str(tmp_path / 'no_run')
  for kwargs, name in (({'delta': 0.0}, 'delta'), ({'epsilon': 1.0}, 'epsilon'),
                       ({'risk': 'bleu'}, 'risk'), ({'measures': ['oracle']}, 'measure'),
                       ({'splits': -1}, 'splits')):
    with pytest.raises(cli.UserError, match=name):
      calibration_run.calibrate_run(config, missing, **kwargs)
  bad = ad.load_config(os.path.join(REPO, CONFIG), {'generate.threshold': 'auto'})
  with pytest.raises(ad.config_lib.ConfigError, match='config.generate.threshold'):
    ad.config_lib.validate(bad)
  small = ad.load_config(os.path.join(REPO, CONFIG), {'calibrate.num_examples': 1})
  with pytest.raises(cli.UserError, match='each needs at least 1'):
    calibration_run.calibrate_run(small, missing, splits=10)
  # From the command line (one line, exit status 2): test_cli.py's cases
  # calibrate-delta_out_of_range and generate-calibrated_threshold_without_file.
