r"""Calibrates early-exit thresholds: python launch/calibrate.py --config=configs/shared_exit.py --workdir=DIR --delta=0.1 --epsilon=0.05 --risk=textual --measure=max_prob

Learn-then-Test on a pool of validation examples (config.calibrate): per measure, the most
aggressive threshold whose risk against full depth is at most delta with probability at
least 1 - epsilon. Writes DIR/calibration.json, which
--config.generate.threshold=calibrated then reads in generate, evaluate, benchmark and serve.
--splits=100 also checks the guarantee on 100 random calibration/test splits of the pool at
each of --deltas, prints the table and writes DIR/calibration_validity.json.
"""
from absl import flags
from ml_collections import config_flags

from adaptive_depth import cli
from adaptive_depth.calibrate import calibration_run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a training run.')
_MEASURE = flags.DEFINE_list('measure', ['max_prob'], 'Confidence measure(s) to calibrate.')
_RISK = flags.DEFINE_string('risk', 'textual', 'textual | rouge | mismatch | loss.')
_DELTA = flags.DEFINE_float('delta', 0.1, 'Risk level, in (0, 1).')
_EPSILON = flags.DEFINE_float('epsilon', 0.05, 'Error probability, in (0, 1).')
_SPLITS = flags.DEFINE_integer('splits', 0, 'Random splits for the validity check (0 = off).')
_DELTAS = flags.DEFINE_list('deltas', ['0.05', '0.1', '0.2'], 'Risk levels of the check.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  try:
    deltas = [float(d) for d in _DELTAS.value]
  except ValueError:
    raise cli.UserError(f'deltas (--deltas)={",".join(_DELTAS.value)}: expected numbers in '
                        '(0, 1), e.g. 0.05,0.1,0.2') from None
  calibration_run.calibrate_run(
      _CONFIG.value, _WORKDIR.value, measures=_MEASURE.value, risk=_RISK.value,
      delta=_DELTA.value, epsilon=_EPSILON.value, splits=_SPLITS.value, deltas=deltas)


if __name__ == '__main__':
  cli.run(main)
