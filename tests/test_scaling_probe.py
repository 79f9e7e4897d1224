"""launch/decode_probe.py's measurements (decode.scaling_probe) on a tiny model: the report
holds what the note quotes, and bad settings are refused before anything compiles."""
import json

import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth.decode import scaling_probe


def test_probe_reports_cache_cost_and_batch_ratios(tmp_path):
  config = ad.load_config('configs/quickstart.py:tiny')
  out = tmp_path / 'probe.json'
  report = scaling_probe.run_probe(config, str(out), batches=(1, 2), new_tokens=(2, 5),
                                   prompt_len=3, repeats=1, progress=lambda _: None)
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  one, two = report['rows']
  assert one['cache_positions'] == {2: 6, 5: 9}
  assert one['decode_batch_ratio'] == one['matmul_chain_batch_ratio'] == 1.0
  for row in report['rows']:
    short, long = row['decode_ms_per_step_2_new'], row['decode_ms_per_step_5_new']
    assert row['cache_length_cost'] == pytest.approx(long / short - 1.0)
    assert row['decode_tokens_per_second'] == pytest.approx(row['batch'] / short * 1e3)
  assert two['decode_batch_ratio'] == pytest.approx(
      two['decode_tokens_per_second'] / one['decode_tokens_per_second'])


def test_probe_needs_batch_one(tmp_path):
  config = ad.load_config('configs/quickstart.py:tiny')
  with pytest.raises(config_lib.ConfigError, match=r'batches=\[2, 8\]: include 1'):
    scaling_probe.run_probe(config, str(tmp_path / 'p.json'), batches=(2, 8))
