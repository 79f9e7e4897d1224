r"""Serves a file of prompts: python launch/serve.py --config=configs/shared_exit.py --workdir=DIR --prompts=FILE --out=RESULTS.jsonl

Every request goes through the depth-wise batching engine (adaptive_depth.serving): a table
of config.serve.slots slots, each token at its own depth, refilled as requests finish.
FILE holds one prompt per line, or (FILE.jsonl) one {"prompt": ..., "max_new_tokens": N}
object per line. The exit policy, KV policy and sampling come from config.generate, e.g.
--config.generate.measure=max_prob --config.generate.threshold=0.6.
"""
from absl import flags
from ml_collections import config_flags

from adaptive_depth import cli
from adaptive_depth.serving import requests_file

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a trained (or converted) model.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'Prompts: one per line, or a .jsonl file.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the results (JSONL).')
flags.mark_flags_as_required(['config', 'workdir', 'prompts', 'out'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  requests_file.serve_file(_CONFIG.value, _WORKDIR.value, _PROMPTS.value, _OUT.value)


if __name__ == '__main__':
  cli.run(main)
