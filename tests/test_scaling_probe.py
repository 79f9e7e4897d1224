"""launch/decode_probe.py (decode.scaling_probe): bad settings are refused before anything
compiles, and the block chain holds every product of a decode step. (Its measurements are
figures, quoted from real runs in the README, not tested.)"""
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth import model as model_lib
from adaptive_depth.decode import scaling_probe


def test_probe_needs_batch_one(tmp_path):
  config = ad.load_config('configs/quickstart.py:tiny')
  with pytest.raises(config_lib.ConfigError, match=r'batches=\[2, 8\]: include 1'):
    scaling_probe.run_probe(config, str(tmp_path / 'p.json'), batches=(2, 8))


@pytest.mark.parametrize('kwargs, message', [
    (dict(new_tokens=(32,)), r'--new_tokens=\[32\]: give a short and a long'),
    (dict(repeats=0), r'--repeats=\[0\]: must be >= 1'),
])
def test_probe_refuses_bad_settings(tmp_path, kwargs, message):
  config = ad.load_config('configs/quickstart.py:tiny')
  with pytest.raises(config_lib.ConfigError, match=message):
    scaling_probe.run_probe(config, str(tmp_path / 'p.json'), **kwargs)


def test_probe_refuses_an_output_folder_that_does_not_exist(tmp_path):
  config = ad.load_config('configs/quickstart.py:tiny')
  with pytest.raises(ad.PathError, match='--out=.*does not exist'):
    scaling_probe.run_probe(config, str(tmp_path / 'nowhere' / 'p.json'))


def test_probe_refuses_bad_read_chunks(tmp_path):
  config = ad.load_config('configs/quickstart.py:tiny')
  with pytest.raises(config_lib.ConfigError, match=r'--read_chunks=\[64, 64\]: distinct'):
    scaling_probe.run_probe(config, str(tmp_path / 'p.json'), read_chunks=(64, 64))


def test_block_chain_makes_every_product_of_a_decode_step():
  """The block chain's compiled program multiplies by every weight once per token (XLA's
  FLOP count of one pass, so that the count does not depend on how XLA counts a loop's
  trips): no product was left out as unused."""
  cfg = model_lib.ModelConfig.from_config(ad.load_config('configs/quickstart.py:tiny').model)
  compiled, _ = scaling_probe.block_chain_program(cfg, batch=2, steps=1)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # a list in older jax
  heads, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = (cfg.width * heads + 2 * cfg.width * kv + heads * cfg.width
               + 3 * cfg.width * cfg.mlp_dim)
  weights = cfg.num_layers * per_layer + cfg.width * cfg.vocab_size
  assert 1.0 <= cost['flops'] / (2 * 2 * weights) < 1.1


def test_probe_reports_intervals_around_its_medians(tmp_path):
  """A tiny run: each row's intervals hold the median the row reports, from the same
  rounds; the figures themselves are not checked (timing)."""
  config = ad.load_config('configs/quickstart.py:tiny')
  report = scaling_probe.run_probe(config, str(tmp_path / 'p.json'), batches=(1, 2),
                                   new_tokens=(2, 4), prompt_len=4, repeats=3,
                                   progress=lambda _: None)
  for row in report['rows']:
    intervals = row['intervals']
    assert intervals['cache_length_cost']['median'] == row['cache_length_cost']
    assert intervals['decode_batch_ratio']['median'] == row['decode_batch_ratio']
    for stats in intervals.values():
      assert stats['low'] <= stats['median'] <= stats['high'] and stats['rounds'] == 3
