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
from tests import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**train):
  config = ad.load_config(os.path.join(REPO, 'configs/quickstart.py:tiny'))
  with config.unlocked():
    config.train.update(train)
  return config


@pytest.mark.parametrize('exit_loss,loss_chunk_tokens', [('lm', 0), ('lm_distill', 8)])
def test_split_step_equals_the_whole_batch_step(exit_loss, loss_chunk_tokens):
  """The same loss, gradient norm, parameters and optimizer state after a step, split or
  not: the mean of equal parts' mean losses is the batch's mean loss."""
  config = _tiny(loss_chunk_tokens=loss_chunk_tokens, exit_loss=exit_loss)
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = tiny_models.init_params(cfg, jax.random.key(0))
  tx = state_lib.make_optimizer(config.train)
  state = state_lib.TrainState(step=np.int32(0), params=params,
                               opt_state=jax.jit(tx.init)(params))  # one program each
  weights = losses.exit_loss_weights(config.train.exit_loss_weights, cfg.exit_depths)
  batch = step_benchmark.random_batch(config)
  steps = {splits: loop.make_train_step(cfg, tx, weights, lambda x: x, splits=splits,
                                        exit_loss=exit_loss,
                                        loss_chunk_tokens=loss_chunk_tokens)
           for splits in (1, 2)}
  # The split really happened: each part runs the model, so twice the matrix products.
  count = lambda splits: str(jax.make_jaxpr(steps[splits])(state, batch)).count('dot_general')
  assert count(2) > 1.8 * count(1)
  state, _ = jax.jit(steps[1])(state, batch)  # the warm-up's first learning rate is zero
  params = state.params
  (whole_state, whole), (split_state, split) = [jax.jit(steps[s])(state, batch) for s in (1, 2)]
  # Before the optimizer: the loss and the gradient's norm, to float32 rounding.
  for key in ('loss', 'grad_norm', 'exit_loss', 'exit_accuracy'):
    np.testing.assert_allclose(np.asarray(split[key]), np.asarray(whole[key]), rtol=2e-6,
                               atol=1e-7)
  for got, want in zip(jax.tree.leaves(split_state), jax.tree.leaves(whole_state)):
    # Adam divides by the gradient's running scale: rounding differences of near-zero
    # gradient entries show up in their updates (at most 1e-5 against updates of ~3e-3).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  # Not vacuous: the step moved the parameters.
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
              zip(jax.tree.leaves(whole_state.params), jax.tree.leaves(params)))
  assert moved > 1e-4


def test_benchmark_times_each_split(tmp_path):
  # 'auto', the config's own attention: the benchmark's two steps are then the programs the
  # test above compiled (test_split_step_equals_the_whole_batch_step[lm-0]): after it, the
  # persistent compilation cache holds them.
  rows = step_benchmark.run_step_benchmark(
      _tiny(), str(tmp_path / 'b.json'), implementations=['auto'], rounds=1,
      batch_splits=[1, 2], progress=lambda _: None)
  assert [(r['implementation'], r['batch_splits']) for r in rows] == [
      ('auto, 1 part', 1), ('auto, 2 parts', 2)]
  assert all(r['step_ms'] > 0 for r in rows)
  with pytest.raises(config_lib.ConfigError, match='--batch_splits'):
    step_benchmark.run_step_benchmark(_tiny(), str(tmp_path / 'c.json'), implementations=['xla'],
                                      batch_splits=[3])


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
  mor_cfg = model_lib.ModelConfig.from_config(mor.model)
  with pytest.raises(config_lib.ConfigError, match='routes over the whole batch'):
    loop.batch_splits(mor, mor_cfg)
  with pytest.raises(config_lib.ConfigError, match='routes over the whole batch'):
    loop.make_train_step(mor_cfg, None, None, lambda x: x, splits=2)
