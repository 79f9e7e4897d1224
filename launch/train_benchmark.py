r"""Train step benchmark: python launch/train_benchmark.py --config=configs/quickstart.py --out=FILE.json

The jitted train step alone (no data pipeline), under each --attention implementation, timed
in interleaved rounds (adaptive_depth/train/step_benchmark.py): median ms per step,
tokens/s and FLOP/s by XLA's count. Random parameters and batch: no workdir needed.
--torch also times the same step written in PyTorch (launch/torch_train_reference.py; eager,
on --torch_threads threads) in the same rounds, and reports each step's speed relative to it.
PyTorch runs in processes of its own, twice: as it runs by default ('pytorch') and with the
malloc settings this library makes at import ('pytorch_keep_malloc'; see
adaptive_depth/host_memory.py).
--whole_run_steps=N also runs the training loop itself (data pipeline, logging, checkpoints)
and reports its tokens/s as a fraction of the step alone. --batch_splits=1,2 times each
implementation with the batch whole and in two parts (config.train.batch_splits).
--full_recursion (a Mixture-of-Recursions config, expert choice) instead times the routed step
against the same model with every token running every recursion, beside the FLOP ratio
adaptive_depth.costs predicts:
  python launch/train_benchmark.py --config=configs/mor.py --full_recursion --out=FILE.json
"""
import functools
import os

from absl import flags
from ml_collections import config_flags

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth.train import step_benchmark

import torch_train_reference  # beside this file: PyTorch stays out of the library

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report.')
_ATTENTION = flags.DEFINE_string('attention', 'xla,heads_major,dot_product_attention',
                                 'Attention implementations to time (config.model.attention).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds, each running every implementation '
                               'once in turn (figures are medians over rounds); 0: compile '
                               'only, and report the memory each step needs.')
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the PyTorch eager step (needs the '
                           'parity extra).')
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', len(os.sched_getaffinity(0)),
                                      'PyTorch threads (default: the cores this process may '
                                      'use, as XLA does).')
_WHOLE_RUN_STEPS = flags.DEFINE_integer(
    'whole_run_steps', 0, 'Also run the training loop of launch/train.py for this many steps '
    '(between two halves of the rounds) and compare its tokens/s with the step alone.')
_BATCH_SPLITS = flags.DEFINE_string(
    'batch_splits', '', 'Comma-separated values of config.train.batch_splits to time each '
    'implementation under, in the same rounds (default: the config\'s own).')
_FULL_RECURSION = flags.DEFINE_bool(
    'full_recursion', False, 'MoR: time the routed train step against every token running '
    'every recursion (ignores --attention, --torch, --whole_run_steps).')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = config_lib.validate(_CONFIG.value)
  if _FULL_RECURSION.value:
    step_benchmark.full_recursion_benchmark(config, _OUT.value, rounds=_ROUNDS.value)
    return
  references = {}
  if _TORCH.value:
    # Each in a process of its own (own heap): as PyTorch runs by default, and with the
    # malloc settings this library makes at import (adaptive_depth/host_memory.py).
    for name, host_malloc in (('pytorch', 'system'), ('pytorch_keep_malloc', 'keep')):
      references[name] = functools.partial(
          torch_train_reference.SubprocessStep, config.model, config.train,
          threads=_TORCH_THREADS.value, host_malloc=host_malloc)
  step_benchmark.run_step_benchmark(
      config, _OUT.value,
      implementations=config_lib.parse_list(_ATTENTION.value, str, '--attention'),
      rounds=_ROUNDS.value, reference_steps=references,
      whole_run_steps=_WHOLE_RUN_STEPS.value,
      batch_splits=(config_lib.parse_list(_BATCH_SPLITS.value, int, '--batch_splits')
                    if _BATCH_SPLITS.value else ()))


if __name__ == '__main__':
  cli.run(main)
