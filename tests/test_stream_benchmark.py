"""The engine benchmark (config.benchmark.mode='engine') on a tiny shared-block model: the
four methods decode the same seeded stream; the engine at full depth reproduces static
batching's tokens, and the engine with early exit reproduces per-row early exit's tokens and
depths (both equal batch-1 decoding with the same policy)."""
import json

import pytest

import adaptive_depth as ad
from adaptive_depth import costs
from adaptive_depth.data import tokenizers
from adaptive_depth.serving import stream_benchmark
from tests import tiny_models


def test_engine_benchmark_rows(tmp_path):
  workdir = tiny_models.save_workdir(str(tmp_path / 'model'), 'configs/shared_exit.py:tiny')
  config = ad.load_config('configs/shared_exit.py:tiny')
  b = config.benchmark
  b.mode, b.slots, b.num_requests, b.repeats = 'engine', '3', 7, 1
  b.prompt_lens, b.output_lens, b.thresholds, b.measure = '2,20', '2,6', '0.5', 'max_prob'
  config.serve.chunk_ticks = 4
  out = str(tmp_path / 'engine.json')
  rows = stream_benchmark.run_engine_benchmark(config, workdir, out, progress=lambda _: None)
  assert json.loads(open(out).read()) == rows
  assert (tmp_path / 'engine.png').exists()
  by_mode = {r['mode']: r for r in rows}
  assert sorted(by_mode) == ['engine', 'engine_exit', 'per_row_exit', 'static']
  prompts, max_new = stream_benchmark.request_stream(tokenizers.ByteTokenizer(), 7, (2, 20),
                                                     (2, 6), 0)
  assert all(2 <= len(p) <= 20 for p in prompts) and sum(max_new) == rows[0]['tokens']
  assert by_mode['engine']['sequence_agreement'] == 1.0
  assert by_mode['engine']['agreement'] == by_mode['static']['agreement'] == 1.0
  assert by_mode['engine']['mean_depth'] == by_mode['static']['mean_depth'] == 4
  exit_rows = by_mode['engine_exit'], by_mode['per_row_exit']
  assert exit_rows[0]['mean_depth'] < 4  # the threshold makes tokens leave early
  for key in ('mean_depth', 'agreement', 'sequence_agreement'):
    assert exit_rows[0][key] == exit_rows[1][key], key
  # (a) pays for every row of a batch until its longest request ends; the engine for tokens.
  assert by_mode['static']['slot_utilisation'] < 1.0
  assert by_mode['engine']['theoretical_speedup'] > 1.0
  # The time split of each engine row: every kind of call ran and was timed, and the timed
  # calls fit in the pass's wall time (compiles, which the wall time leaves out, are not
  # counted in them).
  for row in (by_mode['engine'], by_mode['engine_exit']):
    split = row['time_split']
    assert all(split[f'{kind}_seconds'] > 0 for kind in ('prefill', 'insert', 'generate'))
    assert split['host_seconds'] >= 0, split
    assert split['ms_per_tick'] > 0
    assert row['seconds_without_prefill_ahead'] > 0
  # The prompts' FLOPs: (a) prefills every row (the last batch's 2 dummies too) padded to the
  # stream's longest prompt rounded up to 16 (18 -> 32); the engine each prompt to a multiple
  # of 16.
  model_cfg = ad.load(workdir).model_config
  assert max(len(p) for p in prompts) == 18
  static_prefill = costs.prefill_flops(model_cfg, [32] * 9)
  engine_prefill = costs.prefill_flops(model_cfg, [-(-len(p) // 16) * 16 for p in prompts])
  assert by_mode['static']['prefill_flops'] == static_prefill > engine_prefill
  for row in rows:
    row_prefill = engine_prefill if row['mode'].startswith('engine') else static_prefill
    assert row['prefill_flops'] == row_prefill
    theoretical = ((by_mode['static']['flops'] + static_prefill)
                   / (row['flops'] + row_prefill))
    assert row['theoretical_speedup_with_prefill'] == pytest.approx(theoretical)
    assert row['realized_over_theoretical_with_prefill'] == pytest.approx(
        row['realized_speedup'] / theoretical)
  # Decode alone: (a)'s seconds less its prefill pass, over the engine's waited pass less its
  # prefill calls.
  static_decode = by_mode['static']['seconds'] - by_mode['static']['prefill_seconds']
  assert by_mode['static']['prefill_seconds'] > 0
  for row in (by_mode['engine'], by_mode['engine_exit']):
    split = row['time_split']
    assert row['realized_decode_speedup'] == pytest.approx(
        static_decode / (split['seconds'] - split['prefill_seconds']))
    assert row['realized_decode_over_theoretical'] == pytest.approx(
        row['realized_decode_speedup'] / row['theoretical_speedup'])
