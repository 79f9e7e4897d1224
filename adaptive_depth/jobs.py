"""`train_and_evaluate(config, workdir)`: the job `launch/train.py` runs, by `config.stage`.

  model            train (or resume) the model: adaptive_depth.train.loop
  exit_classifier  train the learned exit classifier of the model already in workdir
"""
from __future__ import annotations

import ml_collections

from adaptive_depth import config_lib
from adaptive_depth.train import classifier
from adaptive_depth.train import loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates `config` (before anything compiles) and runs its stage in `workdir`; returns
  the stage's summary (also written as JSON in the workdir)."""
  config_lib.validate(config)
  if config.stage == 'exit_classifier':
    return classifier.train_exit_classifier(config, workdir)
  return loop.train_model(config, workdir)
