r"""Evaluates a trained run: python launch/evaluate.py --config=configs/quickstart.py --workdir=DIR.

Restores the latest checkpoint in DIR and writes DIR/eval.json and DIR/eval.png: per-exit
loss and accuracy, and per confidence measure a threshold sweep (mean depth, relative FLOPs,
agreement with the full model, loss). The model comes from DIR; the config supplies the
eval settings (--config.eval.num_batches, --config.eval.batch_size).
"""
from absl import flags
from ml_collections import config_flags

import adaptive_depth as ad
from adaptive_depth import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a training run.')
_MEASURES = flags.DEFINE_list('measures', None, 'Confidence measures to sweep (default: all '
                              'available).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  ad.evaluate_run(_CONFIG.value, _WORKDIR.value, measures=_MEASURES.value)


if __name__ == '__main__':
  cli.run(main)
