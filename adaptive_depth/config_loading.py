"""Loading experiment configs from files, as `--config=file.py:arg` does on the command line."""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py[:ARG]` (calls its get_config(ARG)) and applies overrides.

  overrides: {'train.num_steps': 10, ...}, the same dotted keys as `--config.train.num_steps`.
  Returns a locked ConfigDict (unknown override keys raise).
  """
  file_path, _, arg = path.partition(':')
  if not os.path.exists(file_path):
    raise FileNotFoundError(f'config file {file_path!r} does not exist')
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(file_path))[0], file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  for dotted, value in (overrides or {}).items():
    parent = config
    *groups, leaf = dotted.split('.')
    for group in groups:
      parent = parent[group]
    if leaf not in parent:
      raise KeyError(f'config.{dotted}: unknown key')
    parent[leaf] = value
  return config
