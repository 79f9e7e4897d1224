"""Tests of the command line: every user error is one short line naming the key or path,
with exit status 2 and no traceback, while a crash keeps its traceback; the import structure
of the library (no cycles, no PyTorch); and the launch-side transformers timing."""
from __future__ import annotations

import ast
import collections
import json
import pathlib
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest

import adaptive_depth as ad
from tests import launch_harness
from tests import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = 'configs/quickstart.py:tiny'
MAX_LINES = 3
_PARITY = 'pip install -e ".[parity]"'


def _workdirs(root: pathlib.Path) -> dict:
  """Paths a user may get wrong: missing, empty, a run config without checkpoints, files
  that are no model."""
  empty, config_only = root / 'empty', root / 'config_only'
  empty.mkdir()
  config_only.mkdir()
  (config_only / 'config.json').write_text(ad.load_config(str(REPO / TINY)).to_json())
  (root / 'notes.txt').write_text('not a model\n')
  (root / 'fake.gguf').write_text('not a model\n')
  # A config file that looks up a file it cannot find when it loads (as
  # configs/smollm2_exits.py does with the SmolLM2 GGUF on a machine without it).
  (root / 'needs_file.py').write_text(
      'from adaptive_depth import cli\n\n\ndef get_config():\n'
      f'  raise cli.PathError({str(root / "weights.gguf")!r} + " not found")\n')
  (root / 'prompts.txt').write_text('To be\n')
  (root / 'bad.jsonl').write_text('{"prompt": "To be", "max_new_tokens": -3}\n')
  return {'missing': str(root / 'missing'), 'empty': str(empty),
          'prompts': str(root / 'prompts.txt'), 'bad_jsonl': str(root / 'bad.jsonl'),
          'config_only': str(config_only), 'not_gguf': str(root / 'notes.txt'),
          'fake_gguf': str(root / 'fake.gguf'), 'missing_gguf': str(root / 'missing.gguf'),
          'out': str(root / 'bench.json'), 'out_nowhere': str(root / 'missing' / 'out.json'),
          'needs_file': str(root / 'needs_file.py'), 'weights': str(root / 'weights.gguf')}


class _Case(NamedTuple):
  argv: list  # after the script's path
  names: list  # what the message must name
  marks: tuple = ()
  max_lines: int = MAX_LINES  # of stderr


def _cases(p: dict) -> dict:
  """script -> {case name: _Case}, for the paths `p` of _workdirs."""
  config, nowhere = f'--config={TINY}', f'--workdir={p["missing"]}'
  prompt = '--prompt=To be'
  serving, prompts = '--config=configs/shared_exit.py:tiny', f'--prompts={p["prompts"]}'
  out = f'--out={p["out"]}'

  def workdirs(*argv):
    return {
        'missing_workdir': _Case([*argv, nowhere], [p['missing']]),
        'empty_workdir': _Case([*argv, f'--workdir={p["empty"]}'], [p['empty']]),
        'no_checkpoint': _Case([*argv, f'--workdir={p["config_only"]}'], [p['config_only']]),
    }

  return {
      'train': {
          'misspelt_key': _Case([config, nowhere, '--config.train.num_stepz=3'],
                                ['config.train.num_stepz', 'num_steps']),
          'bad_value': _Case([config, nowhere, '--config.model.num_heads=5'],
                             ['config.model.num_heads', '5']),
          'exit_layers_range': _Case([config, nowhere, '--config.model.exit_layers=0,9'],
                                     ['config.model.exit_layers', '[0, 9]', '1..4']),
          'unknown_config_file': _Case(['--config=configs/nope.py', nowhere],
                                       ['configs/nope.py']),
          'unparsable_value': _Case([config, nowhere, '--config.train.batch_size=many'],
                                    ['config.train.batch_size', 'many']),
          'missing_flag': _Case([config], ['--workdir']),
          'config_file_cannot_load': _Case([f'--config={p["needs_file"]}', nowhere],
                                           [p['weights']]),
          'config_file_cannot_load_with_override': _Case(
              [f'--config={p["needs_file"]}', nowhere, '--config.train.batch_size=2'],
              [p['weights']]),
          'unknown_flag': _Case([config, nowhere, '--worksdir=x'], ['worksdir']),
          'positional_argument': _Case([config, nowhere, 'extra'], ['extra']),
      },
      'generate': {
          'empty_prompt': _Case([config, nowhere, '--prompt='], ['--prompt']),
          'speculative_syntax': _Case([config, nowhere, prompt,
                                       '--config.generate.speculative=3y4'],
                                      ['config.generate.speculative', '3y4']),
          'unknown_kv': _Case([config, nowhere, prompt, '--config.generate.kv=nope'],
                              ['config.generate.kv', 'nope', 'propagate']),
          'top_p_zero': _Case([config, nowhere, prompt, '--config.generate.top_p=0'],
                              ['config.generate.top_p', '0 < top_p <= 1']),
          'negative_temperature': _Case([config, nowhere, prompt,
                                         '--config.generate.temperature=-1'],
                                        ['config.generate.temperature', '-1']),
          # Checked before the run loads: the threshold file calibrate.py writes.
          'calibrated_threshold_without_file': _Case(
              [config, nowhere, prompt, '--config.generate.measure=max_prob',
               '--config.generate.threshold=calibrated'], ['calibration.json'], max_lines=1),
          **workdirs(config, prompt),
      },
      'calibrate': {
          'delta_out_of_range': _Case([serving, nowhere, '--delta=1.5'],
                                      ['delta=1.5', '(0, 1)'], max_lines=1),
          **workdirs(serving),
      },
      'evaluate': {
          'unknown_measure': _Case([config, nowhere, '--measures=nonsense'],
                                   ['--measures', 'nonsense', 'max_prob']),
          'bad_eval_value': _Case([config, nowhere, '--config.eval.batch_size=0'],
                                  ['config.eval.batch_size']),
          **workdirs(config),
      },
      'benchmark': {
          'bad_list': _Case([config, nowhere, f'--out={p["out"]}',
                             '--config.benchmark.batches=1,x'],
                            ['config.benchmark.batches', '1,x']),
          **workdirs(config, f'--out={p["out"]}'),
      },
      'serve': {
          'missing_prompts': _Case([serving, nowhere, f'--prompts={p["missing"]}', out],
                                   [p['missing']]),
          'bad_request': _Case([serving, nowhere, f'--prompts={p["bad_jsonl"]}', out],
                               [p['bad_jsonl'], 'line 1', 'max_new_tokens=-3']),
          'zero_slots': _Case([serving, nowhere, prompts, out, '--config.serve.slots=0'],
                              ['config.serve.slots']),
          'parallel_kv': _Case([serving, nowhere, prompts, out, '--config.generate.kv=parallel'],
                               ['config.generate.kv', 'propagate']),
          'out_folder_missing': _Case([serving, nowhere, prompts, f'--out={p["out_nowhere"]}'],
                                      ['--out', p['out_nowhere']]),
          **workdirs(serving, prompts, out),
      },
      'convert': {
          'not_gguf': _Case([f'--from={p["not_gguf"]}', nowhere], [p['not_gguf']]),
          'fake_gguf': _Case([f'--from={p["fake_gguf"]}', nowhere], [p['fake_gguf']]),
          'missing_gguf': _Case([f'--from={p["missing_gguf"]}', nowhere], [p['missing_gguf']]),
          'missing_flag': _Case([f'--from={p["not_gguf"]}'], ['--workdir']),
      },
  }


# Run last, uncaught: evaluate_run patched to fail as a bug would.
_CRASH = {'script': 'evaluate', 'patch': 'evaluate_run', 'argv': [f'--config={TINY}']}


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """{'paths': the paths the cases name, 'cases': {'script-case': {status, stdout, stderr}},
  'returncode', 'stderr'}: every case of every launch script, in one interpreter."""
  paths = _workdirs(tmp_path_factory.mktemp('cli'))
  scripts = {script: {name: [f'launch/{script}.py', *case.argv] for name, case in cases.items()}
             for script, cases in _cases(paths).items()}
  crash = {**_CRASH, 'argv': [f'launch/{_CRASH["script"]}.py', *_CRASH['argv'],
                              f'--workdir={paths["missing"]}']}
  # Every case in one interpreter (tests/launch_harness.py): imports take seconds, a case
  # milliseconds.
  return {'paths': paths, **launch_harness.run_in_one_interpreter(scripts, crash, timeout=300)}


def _case_params():
  placeholders = collections.defaultdict(str)  # the paths exist once the fixture runs
  return [pytest.param(script, name, marks=case.marks, id=f'{script}-{name}')
          for script, cases in _cases(placeholders).items() for name, case in cases.items()]


@pytest.mark.parametrize('script,name', _case_params())
def test_user_error_is_one_line_and_exit_status_2(launched, script, name):
  result = launched['cases'][f'{script}-{name}']
  stderr = result['stderr']
  case = _cases(launched['paths'])[script][name]
  assert result['status'] == 2, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert 1 <= len(lines) <= case.max_lines, stderr
  assert all(line.startswith('error: ') for line in lines), stderr
  for word in case.names:
    assert word in stderr, f'{word!r} not in {stderr!r}'


def test_a_crash_keeps_its_traceback(launched):
  # The harness's last case: evaluate_run raises a RuntimeError, which cli.run lets through.
  assert launched['returncode'] == 1, launched['stderr'][-3000:]
  assert 'Traceback (most recent call last)' in launched['stderr']
  assert 'RuntimeError: a bug, not a user error' in launched['stderr']


# ----------------------------------------------------------------------------- import structure


def _module_files() -> dict:
  """'adaptive_depth.decode.api' -> its file, for every module and package of the library."""
  files = {}
  for path in sorted((REPO / 'adaptive_depth').rglob('*.py')):
    parts = path.relative_to(REPO).with_suffix('').parts
    files['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return files


def _imports(name: str, path: pathlib.Path, modules) -> tuple[set, set]:
  """(explicit, implicit) imports of module `name`, in functions too: `import a.b.c` and
  `from a.b import c` (c a module) need a.b.c, and run the packages a and a.b first
  (implicit); `from a.b import f` (f a name) needs a.b's namespace (explicit)."""
  package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
  explicit, implicit = set(), set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      explicit.add(target)
      parts = target.split('.')
      implicit.update('.'.join(parts[:i]) for i in range(1, len(parts)))
  return explicit, implicit


def _import_graph() -> dict:
  """module -> the library modules whose code runs for it to import. A module's own parent
  packages are mid-import when it runs, so they count only when it needs their namespace."""
  files = _module_files()
  graph = {}
  for name, path in files.items():
    explicit, implicit = _imports(name, path, files)
    ancestors = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)}
    graph[name] = {m for m in explicit | (implicit - ancestors) if m in files and m != name}
  return graph


def _cycles(graph: dict) -> list[str]:
  cycles, state, stack = [], {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for dep in sorted(graph[module]):
      if state.get(dep) == 'open':
        cycles.append(' -> '.join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep)
    stack.pop()
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module)
  return cycles


def test_the_library_has_no_import_cycle():
  graph = _import_graph()
  assert 'adaptive_depth.config_lib' in graph and graph['adaptive_depth.config_lib']
  assert _cycles(graph) == []


def test_the_library_imports_no_pytorch_and_no_launch_code():
  files = _module_files()
  for name, path in files.items():
    explicit, implicit = _imports(name, path, files)
    roots = {m.split('.')[0] for m in explicit | implicit}
    assert not roots & {'torch', 'transformers', 'launch', 'configs', 'transformers_reference'}, (
        name, roots)


# Imports each library module first, in one interpreter: before each, every library module is
# dropped from sys.modules and the package is replaced by an empty one with the same path, so
# only that module's own imports run, in its order (a cycle breaks some order). The TFDS
# builder module stays: it registers a dataset name once per interpreter, and imports nothing
# from the library. Each file's source is compiled to bytecode once: where no .pyc files are
# written (PYTHONDONTWRITEBYTECODE), compiling the same files again for every module took a
# third of the run's CPU time, and a module's code object runs afresh at each import anyway.
_IMPORT_EACH_FIRST = r'''
import importlib, importlib.machinery, json, os, sys, traceback, types
names, keep = json.loads(sys.argv[1]), 'adaptive_depth.data.tiny_shakespeare'
compiled, get_code = {}, importlib.machinery.SourceFileLoader.get_code
def get_code_once(loader, fullname):
  if loader.path not in compiled:
    compiled[loader.path] = get_code(loader, fullname)
  return compiled[loader.path]
importlib.machinery.SourceFileLoader.get_code = get_code_once
failures = {}
for first in names:
  for name in [n for n in sys.modules if n.split('.')[0] == 'adaptive_depth' and n != keep]:
    del sys.modules[name]
  if first != 'adaptive_depth':
    sys.modules['adaptive_depth'] = types.ModuleType('adaptive_depth')
    sys.modules['adaptive_depth'].__path__ = [os.path.abspath('adaptive_depth')]
  try:
    importlib.import_module(first)
  except Exception:
    failures[first] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
'''


def test_every_module_imports_first_in_a_fresh_interpreter():
  names = ['adaptive_depth.config_lib', *_module_files()]  # config_lib first of all
  result = subprocess.run([sys.executable, '-c', _IMPORT_EACH_FIRST, json.dumps(names)],
                          cwd=REPO, env=subprocess_env.subprocess_env(), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  failures = json.loads(result.stdout.strip().splitlines()[-1])
  assert not failures, '\n'.join(f'{k}:\n{v}' for k, v in failures.items())


# ----------------------------------------------------------------------------- transformers timing


@pytest.fixture
def transformers_reference(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / 'launch'))
  import transformers_reference as module  # pylint: disable=g-import-not-at-top
  return module


@pytest.mark.pretrained
def test_transformers_greedy_generate_is_timed_on_the_prompt(tmp_path, transformers_reference):
  torch = pytest.importorskip('torch', reason=f'needs torch: {_PARITY}')
  transformers = pytest.importorskip('transformers', reason=f'needs transformers: {_PARITY}')
  torch.set_num_threads(1)  # 2 cores shared with XLA: more threads only contend
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      eos_token_id=0))
  model.save_pretrained(tmp_path)  # config.json + model.safetensors
  generate = transformers_reference.greedy_generate(str(tmp_path))
  prompt = np.array([[5, 9, 11, 3], [7, 7, 2, 30]], np.int32)
  tokens, seconds = generate(prompt, 5, 2)
  assert tokens.shape == (2, 5) and seconds > 0
  # Greedy: each token is the argmax of the model's logits after the prompt and the tokens
  # before it, all 5 of them (no early stop at the end-of-sequence id).
  with torch.no_grad():
    logits = model.eval()(torch.as_tensor(np.concatenate([prompt, tokens], 1), dtype=torch.long)
                       ).logits.numpy()
  np.testing.assert_array_equal(tokens, logits[:, prompt.shape[1] - 1:-1].argmax(-1))


def test_transformers_source_must_be_a_model(tmp_path, transformers_reference):
  # Checked before torch loads: a wrong path fails fast, with or without the parity extra.
  with pytest.raises(ad.PathError, match=r"config\.benchmark\.transformers_source=.*\.gguf"):
    transformers_reference.load_transformers_model(str(tmp_path))
