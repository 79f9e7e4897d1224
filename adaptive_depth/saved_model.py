"""`load(workdir)`: a trained model (config, parameters, tokenizer) from its latest checkpoint."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import ml_collections

from adaptive_depth import attention as attention_lib
from adaptive_depth import checkpoint as checkpoint_lib
from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import model as model_lib
from adaptive_depth import sharding
from adaptive_depth.data import tokenizers
from adaptive_depth.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """What generation, evaluation and analysis need from a training run."""
  config: ml_collections.ConfigDict
  model_config: model_lib.ModelConfig
  params: Any
  tokenizer: Any
  step: int

  @functools.cached_property
  def decode_params(self):
    """params in the per-block layout decoding runs fastest on (model.per_block_layout),
    made once per model: a second copy of the block weights."""
    return model_lib.per_block_layout(self.params)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (WORKDIR/config.json), validated."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise cli.PathError(f'{path} not found: is {workdir!r} a training workdir?')
  with open(path) as f:
    saved = json.load(f)
  config = config_lib.base_config()
  config.update_from_flattened_dict(_flatten(saved))
  config.sharding.rules = tuple(tuple(r) for r in saved['sharding']['rules'])
  if attention_lib.platform_error(config.model.attention):
    # How attention is computed is this machine's choice, not the model's: a run trained
    # with 'splash' on TPU loads anywhere.
    config.model.attention = 'auto'
  tokenizer_file = config.data.tokenizer_file
  if tokenizer_file and not os.path.isabs(tokenizer_file):
    # A relative tokenizer file belongs to the workdir (so a workdir can be moved).
    config.data.tokenizer_file = os.path.join(os.path.abspath(workdir), tokenizer_file)
  return config_lib.validate(config)


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    elif key != 'rules':
      flat[f'{prefix}{key}'] = value
  return flat


def from_params(params, config: ml_collections.ConfigDict) -> LoadedModel:
  """A LoadedModel from a parameter pytree and its run config (e.g. straight after
  training in a notebook), for `ad.generate(params, config, prompts)`."""
  config = config_lib.validate(config)
  return LoadedModel(config=config, model_config=model_lib.ModelConfig.from_config(config.model),
                     params=params, tokenizer=tokenizers.from_config(config.data), step=-1)


def load(workdir: str, step: Optional[int] = None, mesh_config=None) -> LoadedModel:
  """Restores the parameters of the latest (or the given) checkpoint step in `workdir`.

  Only the parameters are read: a training run's optimizer state stays on disk (see
  checkpoint.Checkpoints.restore_params), so loading takes the model's memory, not three
  times it.

  mesh_config: where to place them ({'data', 'fsdp', 'tensor'} sizes); by default all local
  devices on the data axis, whatever mesh the run trained on (parameters replicated).
  """
  config = load_run_config(workdir)
  cfg = model_lib.ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh(mesh_config or {'data': -1, 'fsdp': 1, 'tensor': 1})
  rules = tuple(tuple(r) for r in config.sharding.rules)
  abstract, shardings = state_lib.param_shardings(cfg, mesh, rules)
  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           async_save=False)
  try:
    step = checkpoints.latest_step() if step is None else step
    if step is None:
      raise cli.PathError(f'no checkpoint in {checkpoints.directory}')
    params = checkpoints.restore_params(
        step, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  finally:
    checkpoints.close()
  return LoadedModel(config=config, model_config=cfg, params=params,
                     tokenizer=tokenizers.from_config(config.data), step=int(step))
