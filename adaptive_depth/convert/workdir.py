"""Writing an imported model as a workdir that `adaptive_depth.load(DIR)` and the launch
scripts read like a training run's:

    DIR/config.json          the run config (the format train/loop.py writes)
    DIR/config.py            get_config() returning that config (for --config=DIR/config.py)
    DIR/tokenizer.json       the BPE tokenizer (config.data.tokenizer_file points here)
    DIR/checkpoints/0/       the parameters alone (checkpoint item `params`): no optimizer
                             state, which a run started from DIR with
                             config.train.init_from=DIR creates for itself
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from adaptive_depth import checkpoint as checkpoint_lib
from adaptive_depth import config_lib
from adaptive_depth import metrics as metrics_lib
from adaptive_depth.convert import layout

_CONFIG_PY = '''"""Config of a model imported by launch/convert.py from {source}.

    python launch/generate.py --config={config_py} --workdir={workdir} --prompt="..."

get_config() reads config.json beside this file, so the two never disagree.
"""
import os

from adaptive_depth import saved_model


def get_config():
  return saved_model.load_run_config(os.path.dirname(os.path.abspath(__file__)))
'''


def save_workdir(imported: layout.Imported, workdir: str, *, source: str = '',
                 progress: layout.Progress = None) -> str:
  """Writes `imported` (a from_gguf / from_hf_dir result) into `workdir`; returns workdir.

  Refuses a workdir that already holds checkpoints (it would mix two models).
  """
  say = progress or (lambda message: None)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoint_dir) and any(n.isdigit() for n in os.listdir(checkpoint_dir)):
    raise FileExistsError(f'{checkpoint_dir} already holds checkpoints; use a new --workdir')
  os.makedirs(workdir, exist_ok=True)
  config = imported.config.copy_and_resolve_references()
  tokenizer_file = os.path.abspath(os.path.join(workdir, 'tokenizer.json'))
  imported.tokenizer.save(tokenizer_file)
  config.data.tokenizer_file = tokenizer_file
  config_lib.validate(config)  # reads the tokenizer.json just written back
  metrics_lib.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  config_py = os.path.join(workdir, 'config.py')
  with open(config_py, 'w', encoding='utf-8') as f:
    f.write(_CONFIG_PY.format(source=source or 'a pretrained checkpoint', config_py=config_py,
                              workdir=workdir))
  say(f'wrote {tokenizer_file}, config.json and config.py')

  start = time.perf_counter()
  params = jax.tree.map(jnp.asarray, imported.params)
  checkpoints = checkpoint_lib.Checkpoints(checkpoint_dir, keep=1, async_save=False)
  checkpoints.save_params(0, params, {'imported_from': source})
  checkpoints.wait()
  checkpoints.close()
  say(f'wrote checkpoint {checkpoint_dir}/0 in {time.perf_counter() - start:.1f}s')
  return workdir
