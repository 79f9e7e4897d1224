r"""Trains a model: python launch/train.py --config=configs/quickstart.py --workdir=DIR.

Override any key: --config.train.num_steps=200. Running the same command again resumes
from the latest checkpoint in DIR.
"""
from absl import flags
from ml_collections import config_flags

import adaptive_depth as ad
from adaptive_depth import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and summaries.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  ad.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
