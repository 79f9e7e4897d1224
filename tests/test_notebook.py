"""Runs colabs/quickstart.ipynb end to end with tiny settings (about a minute on CPU)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from tests import subprocess_env

nbformat = pytest.importorskip('nbformat', reason='needs nbformat: pip install -e .[test]')
nbclient = pytest.importorskip('nbclient', reason='needs nbclient: pip install -e .[test]')
pytest.importorskip('ipykernel', reason='needs ipykernel: pip install -e .[test]')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS_DIR = os.path.join(REPO_ROOT, 'colabs')
NOTEBOOK = os.path.join(COLABS_DIR, 'quickstart.ipynb')
REPO_URL = 'https://github.com/adaptive-depth/adaptive_depth'
NUM_DEVICES = 3
# Evaluations during the run and at its end: what the notebook's plot shows. Every step
# costs (three devices on the shared cores), so few of them.
NUM_STEPS, EVAL_EVERY = 6, 3


def tiny_parameters(workdir: str) -> str:
  return '\n'.join([
      "CONFIG = 'quickstart'",
      "CONFIG_VARIANT = 'tiny'",
      f'NUM_STEPS = {NUM_STEPS}',
      f'EVAL_EVERY = {EVAL_EVERY}',
      f'WORKDIR = {workdir!r}',
      f'REPO_URL = {REPO_URL!r}',
  ])


def cell(nb, cell_id: str):
  return next(c for c in nb.cells if c.get('id') == cell_id)


def stdout_of(code_cell) -> str:
  return ''.join(o.get('text', '') for o in code_cell.outputs
                 if o.output_type == 'stream' and o.name == 'stdout')


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """The kernel inherits this process's environment: keep it offline, local and on CPU."""
  # A `python3` kernelspec that runs this interpreter, so the kernel imports the same
  # adaptive_depth (and the notebook's install step has nothing to do).
  spec_dir = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'Python 3', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tensorflow_datasets'))
  monkeypatch.setenv('PIP_NO_INDEX', '1')  # a pip install in the notebook must not download
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  # Three CPU devices: the tiny config's batch size (8) is not a multiple of the device count,
  # so the notebook's rounding of the batch sizes runs too.
  for name in ('JAX_PLATFORMS', 'XLA_FLAGS'):
    monkeypatch.setenv(name, subprocess_env.subprocess_env(NUM_DEVICES)[name])


def test_quickstart_notebook_runs(tmp_path, kernel_env):
  workdir = str(tmp_path / 'workdir')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(parameters) == 1, 'the notebook needs exactly one cell tagged `parameters`'
  parameters[0].source = tiny_parameters(workdir)

  client = nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                                   resources={'metadata': {'path': COLABS_DIR}})
  client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails

  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors

  assert f'{NUM_DEVICES} CPU device(s)' in stdout_of(cell(nb, 'devices'))
  with open(os.path.join(workdir, 'config.json')) as f:
    trained = json.load(f)  # the config the run used, after the notebook's batch rounding
  assert trained['train']['num_steps'] == NUM_STEPS
  assert trained['eval']['every_steps'] == EVAL_EVERY
  assert trained['train']['batch_size'] % NUM_DEVICES == 0
  assert trained['eval']['batch_size'] % NUM_DEVICES == 0

  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['step'] == NUM_STEPS
  depths = [record['depth'] for record in summary['eval']]
  assert depths == [1, 2, 3, 4]  # the quickstart exits after every layer
  assert all(math.isfinite(record['loss']) for record in summary['eval'])

  plot = os.path.join(workdir, 'per_exit_loss.png')
  assert os.path.isfile(plot) and os.path.getsize(plot) > 0
  plot_cell = cell(nb, 'plot')
  assert any('image/png' in o.get('data', {}) for o in plot_cell.outputs), 'no figure shown'

  lines = stdout_of(cell(nb, 'predict')).splitlines()
  exit_lines = [line for line in lines if line.startswith('depth ')]
  assert [int(line.split()[1]) for line in exit_lines] == depths
