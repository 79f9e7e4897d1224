"""Launch scripts run through their own `main` and `cli.run`, many runs in one fresh
interpreter: importing the library takes seconds, and a run on a tiny model not much more.

Each run gets the argv it would have on the command line; a script's flags are removed
before the next script defines its own, and every flag is unparsed between runs. Each run's
stdout and stderr are captured at the file descriptor, so what the process itself prints (a
progress bar, absl's logging) is caught too. An optional crash run goes last and uncaught,
so the interpreter itself prints its traceback.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from tests import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]

_HARNESS = r'''
import contextlib, importlib.util, json, os, sys, tempfile, traceback
from absl import flags
import adaptive_depth as ad
from adaptive_depth import cli
scripts, crash, results_path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, 'launch')  # as when a script runs: its directory comes first

def load(script):
  for name in set(flags.FLAGS) - builtin_flags:  # the previous script's, overrides too
    delattr(flags.FLAGS, name)
  spec = importlib.util.spec_from_file_location(f'launch_{script}', f'launch/{script}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

def run(module, argv):
  sys.argv = list(argv)  # config_flags reads its overrides from sys.argv
  flags.FLAGS.unparse_flags()
  cli.run(module.main, argv=argv)

@contextlib.contextmanager
def captured(out):
  """fd 1 and 2 go to temporary files for the with-block; out['stdout'], out['stderr'] then
  hold what was written."""
  files = {name: (fd, tempfile.TemporaryFile('w+')) for name, fd in (('stdout', 1), ('stderr', 2))}
  sys.stdout.flush(); sys.stderr.flush()
  saved = {fd: os.dup(fd) for fd, _ in files.values()}
  for fd, f in files.values():
    os.dup2(f.fileno(), fd)
  try:
    yield
  finally:
    sys.stdout.flush(); sys.stderr.flush()
    for name, (fd, f) in files.items():
      os.dup2(saved[fd], fd)
      os.close(saved[fd])
      f.seek(0)
      out[name] = f.read()
      f.close()

builtin_flags = set(flags.FLAGS)
results = {}
for script, cases in scripts.items():
  module = load(script)
  for name, argv in cases.items():
    result = {}
    with captured(result):
      try:
        run(module, argv)
        result['status'] = 0
      except SystemExit as e:  # cli.run ends as absl's app.run does: SystemExit(None) = 0
        result['status'] = 0 if e.code is None else e.code
      except BaseException:
        traceback.print_exc()
        result['status'] = 'crash'
    results[f'{script}-{name}'] = result
with open(results_path, 'w') as f:  # a file: whatever else reaches stdout cannot garble it
  json.dump(results, f)

if crash:
  def broken(*args, **kwargs):
    raise RuntimeError('a bug, not a user error')
  setattr(ad, crash['patch'], broken)
  run(load(crash['script']), crash['argv'])
'''


def run_in_one_interpreter(scripts: dict, crash: dict | None = None,
                           timeout: float = 600) -> dict:
  """scripts: {script name under launch/: {case name: argv, argv[0] the script's path}};
  crash: optional {'script', 'patch': an adaptive_depth attribute replaced by a function
  that raises RuntimeError, 'argv'}, run last. Returns {'cases': {'script-case': {'status':
  exit status (0, SystemExit's code, or 'crash'), 'stdout', 'stderr'}}, 'returncode',
  'stderr'} (the last two: the interpreter's own)."""
  with tempfile.TemporaryDirectory() as folder:
    results_path = os.path.join(folder, 'results.json')
    result = subprocess.run(
        [sys.executable, '-c', _HARNESS, json.dumps(scripts), json.dumps(crash or {}),
         results_path],
        cwd=REPO, env=subprocess_env.subprocess_env(), capture_output=True, text=True,
        timeout=timeout)
    assert os.path.exists(results_path), f'no results; stderr:\n{result.stderr[-3000:]}'
    with open(results_path) as f:
      cases = json.load(f)
  return {'cases': cases, 'returncode': result.returncode, 'stderr': result.stderr}
