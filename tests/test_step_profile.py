"""step_profile.profile_step: the traced train step's operations joined to the compiled HLO."""
import json
import os

import pytest

import adaptive_depth as ad
from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth.train import step_profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
  return ad.load_config(os.path.join(REPO, 'configs/quickstart.py:tiny'))


def test_profile_joins_the_trace_to_the_compiled_step(tmp_path):
  config = _tiny()
  report = step_profile.profile_step(config, str(tmp_path / 'profile'), steps=2, top=5,
                                     progress=lambda _: None)
  with open(tmp_path / 'profile' / 'profile.json') as f:
    assert json.load(f) == report
  # Every listed operation was joined to the op_name the compiled step's HLO gives it.
  assert 0 < len(report['slowest']) <= 5
  for row in report['slowest']:
    assert 'train_step' in row['op_name'], row
  # A train step has a forward and a backward pass, and its operations take time.
  assert report['by_pass']['forward'] > 0 and report['by_pass']['backward'] > 0
  for grouping in ('by_pass', 'by_part', 'by_kind'):
    assert sum(report[grouping].values()) == pytest.approx(report['operations_ms'], rel=1e-9)
  assert report['traced_step_ms'] > 0
  times = [row['ms'] for row in report['slowest']]
  assert times == sorted(times, reverse=True)


def test_bad_arguments_are_refused_before_compiling(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='--steps=0'):
    step_profile.profile_step(_tiny(), str(tmp_path / 'p'), steps=0)
  with pytest.raises(cli.PathError, match='--out'):
    step_profile.profile_step(_tiny(), str(tmp_path / 'missing' / 'p'))
