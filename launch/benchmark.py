r"""Decode speed: python launch/benchmark.py --config=configs/deep_exit.py --workdir=DIR --out=FILE.json

With --config.benchmark.mode=engine (e.g. --config=configs/shared_exit.py): a seeded stream
of requests through static batching, per-row early exit, and the depth-wise batching engine
at full depth and with early exit, at each slot count of config.benchmark.slots
(adaptive_depth/serving/stream_benchmark.py). Otherwise (mode 'decode'):
Full depth, early exit (each KV policy at several thresholds) and self-speculative decoding
at each batch size of config.benchmark, on the model trained in DIR. Writes FILE.json (a list
of rows) and FILE.png. Override settings on the command line, e.g.
--config.benchmark.batches=1 --config.benchmark.thresholds=0.8,0.9.
--config.benchmark.transformers_source=PATH (a .gguf file or a Hugging Face directory of the
same model) also times the `transformers` library's generate (pip install -e ".[parity]").
"""
from absl import flags
from ml_collections import config_flags

from adaptive_depth import benchmark
from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth.serving import stream_benchmark

import transformers_reference  # beside this file: the project's only PyTorch code

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a trained (or converted) model.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON rows (the plot goes beside).')
flags.mark_flags_as_required(['config', 'workdir', 'out'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = config_lib.validate(_CONFIG.value)
  if config.benchmark.mode == 'engine':
    stream_benchmark.run_engine_benchmark(config, _WORKDIR.value, _OUT.value)
    return
  source = config.benchmark.transformers_source
  reference = transformers_reference.greedy_generate(source) if source else None
  benchmark.run_benchmark(config, _WORKDIR.value, _OUT.value, transformers_generate=reference)


if __name__ == '__main__':
  cli.run(main)
