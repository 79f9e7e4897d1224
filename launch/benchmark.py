r"""Decode speed: python launch/benchmark.py --config=configs/deep_exit.py --workdir=DIR --out=FILE.json

Full depth, early exit (each KV policy at several thresholds) and self-speculative decoding
at each batch size of config.benchmark, on the model trained in DIR. Writes FILE.json (a list
of rows) and FILE.png. Override settings on the command line, e.g.
--config.benchmark.batches=1 --config.benchmark.thresholds=0.8,0.9.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from adaptive_depth import benchmark
from adaptive_depth import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a trained (or converted) model.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON rows (the plot goes beside).')
flags.mark_flags_as_required(['config', 'workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  benchmark.run_benchmark(config_lib.validate(_CONFIG.value), _WORKDIR.value, _OUT.value)


if __name__ == '__main__':
  app.run(main)
