r"""Trains a model: python launch/train.py --config=configs/quickstart.py --workdir=DIR.

Override any key: --config.train.num_steps=200. Running the same command again resumes
from the latest checkpoint in DIR.
"""
from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

import adaptive_depth as ad

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and summaries.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  ad.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
