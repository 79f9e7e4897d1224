"""launch/serve.py's job (serving.requests_file): requests from a text or JSONL file through
the engine, one JSON result per request in file order, each equal to the request decoded
alone by ad.generate (greedy, same exit policy)."""
import json

import jax
import pytest

import adaptive_depth as ad
from adaptive_depth import cli
from adaptive_depth import exits
from adaptive_depth.serving import continuous_batching
from adaptive_depth.serving import requests_file
from tests import compile_counter
from tests import tiny_models

CONFIG = 'configs/shared_exit.py:tiny'


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A saved shared-block model (parameters only, as convert leaves them)."""
  return tiny_models.save_workdir(str(tmp_path_factory.mktemp('served') / 'model'), CONFIG)


def _config(**generate):
  config = ad.load_config(CONFIG)
  config.serve.slots = 2
  config.serve.chunk_ticks = 4
  for key, value in generate.items():
    config.generate[key] = value
  return config


def test_jsonl_requests_come_back_in_order_as_decoded_alone(workdir, tmp_path):
  prompts = ['To be, or not', 'A horse!', 'Now is the winter', 'O', 'Friends, Romans']
  budgets = [5, None, 2, 7, None]
  lines = [json.dumps({'prompt': p, **({'max_new_tokens': n} if n else {})})
           for p, n in zip(prompts, budgets)]
  (tmp_path / 'in.jsonl').write_text('\n'.join(lines) + '\n')
  config = _config(max_new_tokens=4, measure='max_prob', threshold=0.5)
  requests_file.serve_file(config, workdir, str(tmp_path / 'in.jsonl'),
                           str(tmp_path / 'out.jsonl'), progress=lambda _: None)
  results = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
  assert [r['request'] for r in results] == list(range(len(prompts)))
  assert [r['prompt'] for r in results] == prompts
  model = ad.load(workdir)
  policy = exits.ExitPolicy(measure='max_prob', threshold=0.5)
  for result, prompt, budget in zip(results, prompts, budgets):
    # One compiled program for every request: greedy decoding is prefix-consistent, so the
    # request's own budget is a cut of the longest.
    alone = ad.generate(model, [prompt], max_new_tokens=7, exit=policy)
    n = budget or 4
    assert result['tokens'] == alone.tokens[0][:n]
    assert result['exit_depths'] == alone.exit_depths[0][:n]
    assert result['text'] == model.tokenizer.decode(alone.tokens[0][:n])


def test_config_serve_and_seed_reach_the_engine(workdir, tmp_path, monkeypatch):
  """Every config.serve key, and config.generate.seed, is what serve is called with."""
  called = []
  real_serve = continuous_batching.serve

  def recording_serve(*args, **kwargs):
    called.append(kwargs)
    return real_serve(*args, **kwargs)

  monkeypatch.setattr(continuous_batching, 'serve', recording_serve)
  (tmp_path / 'in.txt').write_text('To be\nA horse!\nO\n')
  config = _config(max_new_tokens=3, seed=7)
  config.serve.update(prefill_ahead_count=1, cache_len=32, finish_slots=1)
  requests_file.serve_file(config, workdir, str(tmp_path / 'in.txt'),
                           str(tmp_path / 'out.jsonl'), progress=lambda _: None)
  [kwargs] = called
  assert {key: kwargs[key] for key in ('slots', 'chunk_ticks', 'prefill_ahead_count',
                                       'cache_len', 'finish_slots', 'seed')} == dict(
      slots=2, chunk_ticks=4, prefill_ahead_count=1, cache_len=32, finish_slots=1, seed=7)
  assert len((tmp_path / 'out.jsonl').read_text().splitlines()) == 3


def test_text_file_has_one_prompt_per_line(tmp_path):
  (tmp_path / 'in.txt').write_text('first prompt\n\nsecond {"not json"}\n')
  prompts, max_new = requests_file.read_requests(str(tmp_path / 'in.txt'), 9)
  assert prompts == ['first prompt', 'second {"not json"}'] and max_new == [9, 9]


@pytest.mark.parametrize('text,names', [
    ('{"prompt": "a"}\nnot json\n', ['line 2', 'JSON']),
    ('{"prompt": ""}\n', ['line 1', 'empty']),
    ('{"prompt": "a", "max_new_tokens": 0}\n', ['line 1', 'max_new_tokens=0']),
    ('{"prompt": "a", "temperature": 1}\n', ['line 1', 'temperature', 'allowed']),
    ('["a"]\n', ['line 1', '"prompt"']),
    ('\n\n', ['no prompts']),
], ids=['not_json', 'empty_prompt', 'max_new_zero', 'unknown_key', 'not_object', 'empty'])
def test_bad_requests_are_refused_naming_the_line(tmp_path, text, names):
  (tmp_path / 'in.jsonl').write_text(text)
  with pytest.raises(cli.UserError) as raised:
    requests_file.read_requests(str(tmp_path / 'in.jsonl'), 4)
  for name in names:
    assert name in str(raised.value)


def test_a_request_longer_than_the_cache_is_refused_before_compiling(workdir, tmp_path):
  (tmp_path / 'in.txt').write_text('short\n' + 'x' * 40 + '\n')
  config = _config(max_new_tokens=30)
  config.serve.cache_len = 48
  with compile_counter.backend_compiles() as compiles, pytest.raises(
      cli.UserError, match=r'prompts\[1\].*cache_len=48'):
    requests_file.serve_file(config, workdir, str(tmp_path / 'in.txt'),
                             str(tmp_path / 'out.jsonl'))
  assert compiles == []
  assert not (tmp_path / 'out.jsonl').exists()


def test_measure_classifier_reads_the_workdirs_classifier(tmp_path):
  """config.generate.measure='classifier' serves with the classifier saved beside the model.
  Without a saved classifier the error names its path and the command that trains it."""
  from adaptive_depth.train import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  workdir = tiny_models.save_workdir(str(tmp_path / 'model'), CONFIG)
  (tmp_path / 'in.txt').write_text('To be\nA horse!\n')
  with pytest.raises(cli.PathError, match='configs/exit_classifier.py'):
    requests_file.serve_file(_config(measure='classifier'), workdir, str(tmp_path / 'in.txt'),
                             str(tmp_path / 'out.jsonl'))
  cfg = ad.load(workdir).model_config
  classifier_lib.save_classifier(workdir, jax.jit(exits.init_classifier, static_argnums=1)(
      jax.random.key(0), cfg.width + 3 + len(cfg.exit_depths)))  # one program, not op by op
  # Threshold 0: every decoded token leaves at the first exit, by the classifier's say.
  out = requests_file.serve_file(_config(measure='classifier', threshold=0.0, max_new_tokens=4),
                                 workdir, str(tmp_path / 'in.txt'), str(tmp_path / 'out.jsonl'),
                                 progress=lambda _: None)
  assert {d for depths in out.exit_depths for d in depths[1:]} == {1}
