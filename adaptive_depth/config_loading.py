"""Loading experiment configs from files, as `--config=file.py:arg` does on the command line."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from adaptive_depth import cli
from adaptive_depth import config_lib


class UnknownKeyError(config_lib.ConfigError, KeyError):
  """An override of a key the config does not have (a KeyError too, as a dict lookup's)."""
  __str__ = config_lib.ConfigError.__str__  # the message, not KeyError's quoted repr of it


def load_config(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py[:ARG]` (calls its get_config(ARG)) and applies overrides.

  overrides: {'train.num_steps': 10, ...}, the same dotted keys as `--config.train.num_steps`.
  Returns a locked ConfigDict. A missing file raises cli.PathError, an override of a key the
  config does not have UnknownKeyError.
  """
  file_path, _, arg = path.partition(':')
  if not os.path.isfile(file_path):
    raise cli.PathError(f'config file {file_path!r} does not exist')
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(file_path))[0], file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  for dotted, value in (overrides or {}).items():
    problem = cli.unknown_key(config, dotted)
    if problem is not None:
      raise UnknownKeyError(problem)
    parent = config
    *groups, leaf = dotted.split('.')
    for group in groups:
      parent = parent[group]
    parent[leaf] = value
  return config
