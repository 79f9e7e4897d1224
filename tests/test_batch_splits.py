"""config.train.batch_splits: the train step on independent parts of the batch."""
import os

import jax
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth import model as model_lib
from adaptive_depth.train import loop
from adaptive_depth.train import losses
from adaptive_depth.train import state as state_lib
from adaptive_depth.train import step_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**train):
  config = ad.load_config(os.path.join(REPO, 'configs/quickstart.py:tiny'))
  with config.unlocked():
    config.train.update(train)
  return config


@pytest.mark.parametrize('loss_chunk_tokens', [0, 8])
def test_split_step_equals_the_whole_batch_step(loss_chunk_tokens):
  """The same parameters, optimizer state and metrics after a step, split or not: the mean
  of equal parts' mean losses is the batch's mean loss."""
  config = _tiny(loss_chunk_tokens=loss_chunk_tokens)
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tx = state_lib.make_optimizer(config.train)
  state = state_lib.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
  weights = losses.exit_loss_weights(config.train.exit_loss_weights, cfg.exit_depths)
  batch = step_benchmark.random_batch(config)
  steps = {splits: jax.jit(loop.make_train_step(cfg, tx, weights, lambda x: x, splits=splits,
                                                loss_chunk_tokens=loss_chunk_tokens))
           for splits in (1, 2)}
  state, _ = steps[1](state, batch)  # the warm-up's first learning rate is zero
  params = state.params
  results = {splits: step(state, batch) for splits, step in steps.items()}
  (whole_state, whole_metrics) = results[1]
  for splits in (2,):
    split_state, split_metrics = results[splits]
    for got, want in zip(jax.tree.leaves((split_state, split_metrics)),
                         jax.tree.leaves((whole_state, whole_metrics))):
      # Adam divides by the gradient's running scale: rounding differences of near-zero
      # gradient entries show up in their updates (at most 1e-5 against updates of ~3e-3).
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  # Not vacuous: the step moved the parameters.
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
              zip(jax.tree.leaves(whole_state.params), jax.tree.leaves(params)))
  assert moved > 1e-4


def test_automatic_and_refused_splits():
  config = _tiny()
  cfg = model_lib.ModelConfig.from_config(config.model)
  expected = 2 if jax.device_count() == 1 and jax.default_backend() == 'cpu' else 1
  assert loop.batch_splits(config, cfg) == expected
  assert loop.batch_splits(_tiny(batch_splits=1), cfg) == 1
  with pytest.raises(config_lib.ConfigError, match='config.train.batch_splits=3 must divide'):
    config_lib.validate(_tiny(batch_splits=3, batch_size=8))
  with pytest.raises(config_lib.ConfigError, match='config.train.batch_splits=-1'):
    config_lib.validate(_tiny(batch_splits=-1))
  mor = ad.load_config(os.path.join(REPO, 'configs/mor.py:tiny'))
  with mor.unlocked():
    mor.train.batch_splits = 2
  with pytest.raises(config_lib.ConfigError, match='routes over the whole batch'):
    loop.batch_splits(mor, model_lib.ModelConfig.from_config(mor.model))
