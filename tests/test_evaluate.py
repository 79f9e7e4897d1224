"""The second stage (exit classifier) and the evaluation entry point, end to end on a tiny run."""
import json
import os

import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth.train import classifier as classifier_lib
from tests import launch_harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Settings launch/generate.py and launch/benchmark.py (the `launched` fixture) share with
# the in-process tests below: a decode program the launch scripts compiled is then read
# back from the session's compilation cache instead of compiled again (same program, same
# shapes: only the traced threshold, or the measure of the early-exit rows, differs).
GENERATE_NEW_TOKENS = 20
BENCHMARK_SHAPES = {'benchmark.batches': '2', 'benchmark.max_new_tokens': 16,
                    'benchmark.prompt_len': 8, 'benchmark.repeats': 1}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = ad.load_config(os.path.join(REPO, 'configs/recursive.py:tiny'),
                          {'train.num_steps': 30, 'train.progress_bar': False})
  ad.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def classifier_summary(trained):
  """The exit classifier stage, run once on the trained model."""
  clf_config = ad.load_config(os.path.join(REPO, 'configs/exit_classifier.py:tiny'))
  return ad.train_and_evaluate(clf_config, trained)


def test_classifier_stage_then_evaluate(trained, classifier_summary):
  summary = classifier_summary
  assert np.isfinite(summary['final_loss'])
  # The model's own config and checkpoints are untouched by the second stage.
  assert json.load(open(os.path.join(trained, 'config.json')))['stage'] == 'model'
  classifier = classifier_lib.load_classifier(trained)
  assert classifier['w1'].shape[0] == 64 + 3 + 6  # width + statistics + one-hot of 6 exits

  eval_config = ad.load_config(os.path.join(REPO, 'configs/recursive.py:tiny'))
  result = ad.evaluate_run(eval_config, trained, measures=['max_prob', 'classifier'],
                           num_batches=2)
  on_disk = json.load(open(os.path.join(trained, 'eval.json')))
  assert on_disk['per_exit'] == result['per_exit']
  assert [r['depth'] for r in result['per_exit']] == [1, 2, 3, 4, 5, 6]
  assert os.path.getsize(os.path.join(trained, 'eval.png')) > 10_000
  assert set(result['agreement_auc']) == {'max_prob', 'classifier', 'max_prob_per_exit',
                                          'classifier_per_exit'}
  for measure in ('max_prob', 'classifier'):
    rows = result['sweeps'][measure]
    assert len(rows) == 10
    depths = [r['mean_depth'] for r in rows]
    # Thresholds go from conservative to aggressive: depth can only fall.
    assert all(a >= b - 1e-9 for a, b in zip(depths, depths[1:])), depths
  assert len(result['agreement_auc']['classifier_per_exit']) == 5
  # The oracle leaves at the first exit agreeing with the full model, so it exits early.
  assert result['oracle']['mean_depth'] < 6


@pytest.fixture(scope='module')
def launched(trained, tmp_path_factory):
  """launch/evaluate.py, generate.py and benchmark.py on the trained run, in one interpreter
  (tests/launch_harness.py): {'script': its run's {status, stdout, stderr}}, the paths they
  wrote, and eval.json as evaluate.py left it (None if it wrote none; generate.py and
  benchmark.py do not write it, test_classifier_stage_then_evaluate rewrites it)."""
  tmp = tmp_path_factory.mktemp('launched')
  paths = {'html': tmp / 'out.html', 'bench': tmp / 'bench.json'}
  tiny, workdir = '--config=configs/recursive.py:tiny', f'--workdir={trained}'
  scripts = {
      'evaluate': {'run': ['launch/evaluate.py', tiny, workdir, '--measures=softmax_diff',
                           '--config.eval.num_batches=1']},
      'generate': {'run': ['launch/generate.py', tiny, workdir, '--prompt=To be',
                           '--prompt=KING:\n', '--config.generate.measure=max_prob',
                           '--config.generate.threshold=0.0',
                           f'--config.generate.max_new_tokens={GENERATE_NEW_TOKENS}',
                           f'--html={paths["html"]}']},
      'benchmark': {'run': ['launch/benchmark.py', tiny, workdir, f'--out={paths["bench"]}',
                            *(f'--config.{name}={value}'
                              for name, value in BENCHMARK_SHAPES.items()),
                            '--config.benchmark.thresholds=0.0,1.01',
                            '--config.benchmark.speculative=2x3']}}
  result = launch_harness.run_in_one_interpreter(scripts, timeout=2100)  # theirs: 600+600+900
  runs = {script: result['cases'][f'{script}-run'] for script in scripts}
  eval_path = os.path.join(trained, 'eval.json')
  return {**runs, **paths,
          'eval': json.load(open(eval_path)) if os.path.exists(eval_path) else None}


def _ok(run) -> str:
  assert run['status'] == 0, run['stderr'][-3000:]
  return run['stdout']


def test_evaluate_launch_script(launched):
  _ok(launched['evaluate'])
  assert list(launched['eval']['sweeps']) == ['softmax_diff']


def test_generate_launch_script(launched):
  stdout = _ok(launched['generate'])
  assert 'To be' in stdout and 'exit depth:' in stdout
  # Threshold 0 with max_prob: every decoded token leaves at the first exit (depth 1); the
  # first token comes from the full-depth prefill (depth 6, shown, not in the statistics).
  assert 'mean_depth: 1, ' in stdout, stdout[-500:]
  page = launched['html'].read_text()
  decoded_per_prompt = GENERATE_NEW_TOKENS - 1  # the first comes from the prefill
  assert page.count('exit depth 1"') == 2 * decoded_per_prompt, page.count('exit depth 1"')
  assert page.count('exit depth 6"') == 2


def test_benchmark_launch_script(launched):
  _ok(launched['benchmark'])
  out_path = launched['bench']
  rows = json.load(open(out_path))
  assert os.path.getsize(str(out_path).replace('.json', '.png')) > 10_000
  keys = {'mode', 'policy', 'batch', 'threshold', 'tokens_per_second', 'mean_depth',
          'theoretical_speedup', 'realized_speedup', 'agreement'}
  assert all(keys <= set(r) for r in rows)
  # Full, 2 policies x 2 thresholds, one speculative setting (2 rows each decoding alone).
  assert [(r['batch'], r['mode']) for r in rows] == [
      (2, m) for m in ['full'] + ['early_exit'] * 4 + ['speculative']]
  for r in rows:
    assert r['tokens_per_second'] > 0 and r['compile_seconds'] > 0
    if r['mode'] == 'full':
      assert (r['mean_depth'], r['realized_speedup'], r['agreement']) == (6.0, 1.0, 1.0)
    elif r['mode'] == 'speculative':  # exact: the same tokens as full-depth greedy
      assert r['agreement'] == r['sequence_agreement'] == 1.0 and r['mean_depth'] == 6.0
    elif r['threshold'] > 1:  # no token is ever confident enough: full depth, same text
      assert r['mean_depth'] == 6.0 and r['sequence_agreement'] == 1.0
      assert r['theoretical_speedup'] < 1  # it paid for every check and exited nowhere
    elif r['policy'] == 'propagate':  # max_prob >= 0: every decode step leaves at depth 1
      assert r['mean_depth'] == 1.0 and r['theoretical_speedup'] > 2
    else:  # parallel: the 9th of 15 decode steps finds the queue (capacity 8) full
      assert r['mean_depth'] == (14 * 1 + 6) / 15


def test_benchmark_exits_on_the_saved_classifier(trained, classifier_summary, tmp_path):
  """measure 'classifier' reads the classifier saved in the workdir: at threshold 0 every
  decode step leaves at the first exit, at a threshold above 1 none leaves."""
  from adaptive_depth import benchmark
  config = ad.load_config(os.path.join(REPO, 'configs/recursive.py:tiny'), {
      'benchmark.measure': 'classifier', 'benchmark.kv': 'propagate',
      'benchmark.thresholds': '0.0,1.01', 'benchmark.speculative': '', **BENCHMARK_SHAPES})
  rows = benchmark.run_benchmark(config, trained, str(tmp_path / 'bench.json'),
                                 progress=lambda _: None)
  early = {r['threshold']: r for r in rows if r['mode'] == 'early_exit'}
  assert early[0.0]['measure'] == 'classifier' and early[0.0]['mean_depth'] == 1.0
  assert early[1.01]['mean_depth'] == 6.0 and early[1.01]['sequence_agreement'] == 1.0
  empty = tmp_path / 'no_classifier'
  empty.mkdir()
  for name in ('config.json', 'checkpoints'):
    os.symlink(os.path.join(trained, name), empty / name)
  with pytest.raises(ad.PathError, match='no exit classifier.*exit_classifier.py'):
    benchmark.run_benchmark(config, str(empty), str(tmp_path / 'b2.json'),
                            progress=lambda _: None)


def test_generate_api_forms_and_speculative(trained):
  """generate(params, config, prompts) equals generate(model, prompts); speculative=(E, k)
  reproduces full-depth greedy text exactly."""
  model = ad.load(trained)
  prompts = ['To be', 'KING:\n']
  full = ad.generate(model, prompts, max_new_tokens=GENERATE_NEW_TOKENS)
  again = ad.generate(model.params, model.config, prompts, max_new_tokens=GENERATE_NEW_TOKENS)
  spec = ad.generate(model, prompts, max_new_tokens=GENERATE_NEW_TOKENS, speculative=(2, 3))
  assert again.tokens == full.tokens and spec.tokens == full.tokens
  # One compiled program per (settings, shapes): a new threshold or seed reuses it.
  first = ad.generate(model, prompts, max_new_tokens=GENERATE_NEW_TOKENS, exit=ad.ExitPolicy(
      measure='max_prob', threshold=0.3))
  second = ad.generate(model, prompts, max_new_tokens=GENERATE_NEW_TOKENS, exit=ad.ExitPolicy(
      measure='max_prob', threshold=0.6), sampling=ad.Greedy())
  assert first.stats['compile_seconds'] > 0 and second.stats['compile_seconds'] == 0.0
  assert 0 < spec.stats['relative_flops'] and spec.stats['tokens_per_second'] > 0
  with pytest.raises(ValueError, match='draft_depth'):
    ad.generate(model, prompts, speculative=(6, 3))
  with pytest.raises(TypeError, match='list of strings'):
    ad.generate(model, 'To be')
