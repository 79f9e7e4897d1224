"""launch/decode_probe.py (decode.scaling_probe): bad settings are refused before anything
compiles, and the block chain holds every product of a decode step. (Its measurements are
figures, quoted from real runs in the README, not tested.)"""
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth import model as model_lib
from adaptive_depth.decode import kv_cache
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


def test_probe_reports_each_comparison_with_its_interval(tmp_path, monkeypatch):
  """The report's arithmetic on given round times (no program is run): each comparison is
  the median of the rounds' ratios, recomputed here with numpy, inside its interval; the
  batch ratios only above batch 1."""
  rng = np.random.default_rng(0)
  rounds = 7
  def fake_times(programs, repeats):
    assert repeats == rounds
    drift = 1.0 + 0.05 * rng.random(repeats)  # the machine's speed, shared within a round
    def cost(key):  # seconds: decode grows with its tokens, and less than linearly with batch
      if key[0] == 'decode':
        return 1e-3 * key[3] * (1 + key[3] / 100) * key[2] ** 0.5
      return (2e-4 if key[0] == 'chain' else 5e-4) * key[1] ** 0.4
    return {key: list(cost(key) * drift * (1 + 0.2 * rng.random(repeats)))
            for key in programs}
  dummy = lambda *args, **kwargs: (None, ())
  for builder in ('decode_program', 'matmul_chain_program', 'block_chain_program'):
    monkeypatch.setattr(scaling_probe, builder, dummy)
  recorded = {}
  monkeypatch.setattr(scaling_probe.timing, 'interleaved_seconds',
                      lambda programs, repeats: recorded.update(fake_times(programs, repeats))
                      or dict(recorded))
  lines = []
  config = ad.load_config('configs/quickstart.py:tiny')
  report = scaling_probe.run_probe(config, str(tmp_path / 'p.json'), batches=(1, 4),
                                   new_tokens=(8, 32), repeats=rounds, progress=lines.append)
  t = {key: np.asarray(v) for key, v in recorded.items()}
  chunk = kv_cache.READ_CHUNK
  step = lambda batch, n: ((t[('decode', chunk, batch, n)] - t[('decode', chunk, batch, 1)])
                           / (n - 1))
  tps = lambda batch: batch / step(batch, 8)
  one, four = report['rows']
  assert set(one['intervals']) == {'cache_length_cost'}
  chain_ratio = lambda name: (4 / t[(name, 4)]) / (1 / t[(name, 1)])
  # Each comparison per round: numerator / denominator + offset.
  parts = {'cache_length_cost': (step(4, 32), step(4, 8), -1.0),
           'decode_batch_ratio': (tps(4), tps(1), 0.0),
           'decode_over_matmul_chain_batch_ratio': (tps(4) / tps(1), chain_ratio('chain'), 0.0),
           'decode_over_block_chain_batch_ratio': (tps(4) / tps(1), chain_ratio('block_chain'),
                                                   0.0)}
  assert set(four['intervals']) == set(parts)
  for name, (numerator, denominator, offset) in parts.items():
    per_round = numerator / denominator + offset
    # These times tell a median of ratios from a ratio of medians (so the check can fail).
    assert abs(np.median(per_round) - (np.median(numerator) / np.median(denominator) + offset)
               ) > 1e-3
    stats = four['intervals'][name]
    assert stats['median'] == pytest.approx(np.median(per_round), rel=1e-12)
    assert stats['low'] <= stats['median'] <= stats['high'] and stats['rounds'] == rounds
  assert four['cache_length_cost'] == four['intervals']['cache_length_cost']['median']
  assert any('per round: cache-length cost' in line for line in lines)
