"""launch/decode_probe.py (decode.scaling_probe): bad settings are refused before anything
compiles. (Its measurements are figures, quoted from real runs in the README, not tested.)"""
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
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
