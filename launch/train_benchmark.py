r"""Train step benchmark: python launch/train_benchmark.py --config=configs/quickstart.py --out=FILE.json

The jitted train step alone (no data pipeline), under each --attention implementation, timed
in interleaved rounds (adaptive_depth/train/step_benchmark.py): median ms per step,
tokens/s and FLOP/s by XLA's count. Random parameters and batch: no workdir needed.
"""
from absl import flags
from ml_collections import config_flags

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth.train import step_benchmark

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report.')
_ATTENTION = flags.DEFINE_string('attention', 'xla,heads_major,dot_product_attention',
                                 'Attention implementations to time (config.model.attention).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds, each running every implementation '
                               'once in turn (figures are medians over rounds).')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  step_benchmark.run_step_benchmark(
      _CONFIG.value, _OUT.value,
      implementations=config_lib.parse_list(_ATTENTION.value, str, '--attention'),
      rounds=_ROUNDS.value)


if __name__ == '__main__':
  cli.run(main)
