"""Starting a run from another run's parameters (`config.train.init_from`).

The source is any workdir with a config.json and a checkpoint: a training run, or a
pretrained model written by launch/convert.py. Its trunk (every parameter but the exit
heads) must be the model this config describes; what may differ are the exits
(exit_layers, per-exit norms and adapters, which start fresh unless the source has the same
ones) and how it computes (dtype, remat). The new run starts at step 0 with a fresh
optimizer state and data order.

This is step 2 of the resume order in train/loop.py: a checkpoint already in the run's own
workdir wins (resuming never goes back to the source).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import config_lib
from adaptive_depth import exit_heads
from adaptive_depth import model as model_lib
from adaptive_depth import saved_model
from adaptive_depth.data import tokenizers
from adaptive_depth.train import state as state_lib

# ModelConfig fields a source may differ in: the exits, and compute settings that do not
# change what the parameters mean.
NOT_TRUNK = ('exit_depths', 'exit_norms', 'exit_adapter_rank', 'dtype', 'remat', 'init_std',
             'scan_unroll', 'attention')  # the last two: how it runs, not what it is
_PROBE = 'The quick brown fox, 1234: "Hello!"\n'


def _same(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    # An imported 1e-5 may arrive as float32's 9.99999975e-06: the same number to the model.
    return bool(np.isclose(a, b, rtol=1e-6, atol=0.0))
  return a == b


def trunk_differences(cfg: model_lib.ModelConfig, source: model_lib.ModelConfig) -> list[str]:
  """One 'config.model.KEY: SOURCE in the source, VALUE here' line per trunk mismatch."""
  return [f'config.model.{f.name}: {getattr(source, f.name)!r} in the source, '
          f'{getattr(cfg, f.name)!r} here'
          for f in dataclasses.fields(model_lib.ModelConfig)
          if f.name not in NOT_TRUNK and not _same(getattr(source, f.name), getattr(cfg, f.name))]


def check_source(config, cfg: model_lib.ModelConfig):
  """Reads and checks the source's config (cheap: no parameters yet); returns it.

  Raises ConfigError naming config.train.init_from and every differing key when the source
  is missing, holds another trunk, or tokenizes text differently.
  """
  source_dir = config.train.init_from
  where = f'config.train.init_from={source_dir!r}'
  if not os.path.isfile(os.path.join(source_dir, 'config.json')):
    raise config_lib.ConfigError(
        f'{where}: no config.json there; allowed: a workdir written by launch/train.py or '
        'launch/convert.py')
  source_config = saved_model.load_run_config(source_dir)
  source_cfg = model_lib.ModelConfig.from_config(source_config.model)
  problems = trunk_differences(cfg, source_cfg)
  ours, theirs = tokenizers.from_config(config.data), tokenizers.from_config(source_config.data)
  if (ours.vocab_size, ours.eos_id, ours.encode(_PROBE)) != (
      theirs.vocab_size, theirs.eos_id, theirs.encode(_PROBE)):
    problems.append(f'config.data.tokenizer: {source_config.data.tokenizer!r} '
                    f'({source_config.data.tokenizer_file or "no file"}) in the source tokenizes '
                    f'differently from {config.data.tokenizer!r} '
                    f'({config.data.tokenizer_file or "no file"}) here')
  if problems:
    raise config_lib.ConfigError(
        f'{where} holds a different model than this config describes; set these keys as in '
        f'the source (or use another source):\n  ' + '\n  '.join(problems))
  return source_config


def initial_state(config, cfg: model_lib.ModelConfig, tx, shardings) -> state_lib.TrainState:
  """Step 0 of a run started from config.train.init_from, placed in `shardings`, once
  `check_source` has accepted the source (train/loop.py calls it before compiling).

  The trunk is the parameters of the source's latest checkpoint (its optimizer state, if it
  has one, is not read: the run starts a fresh one). Exit heads are the source's when it has
  the same exits and head options, else fresh: norm scales copied from the trunk's final
  norm and adapters with a zero factor, so that every exit starts as it read in the source.
  """
  source = saved_model.load(config.train.init_from)
  params = dict(source.params)
  source_heads = params.pop('exit_heads', None)
  same = False
  if cfg.has_exit_heads:
    same = (source_heads is not None and source.model_config.exit_depths == cfg.exit_depths
            and source.model_config.exit_norms == cfg.exit_norms
            and source.model_config.exit_adapter_rank == cfg.exit_adapter_rank)
    params['exit_heads'] = source_heads if same else exit_heads.init_exit_heads(
        cfg, jax.random.key(config.seed), params['final_norm']['scale'])
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  heads = 'none' if not cfg.has_exit_heads else 'from the source' if same else 'fresh'
  print(f'Starting from the parameters of {config.train.init_from} (its step {source.step}); '
        f'exit heads: {heads}', flush=True)
  return state_lib.TrainState(step=step, params=params, opt_state=opt_state)
