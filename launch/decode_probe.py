r"""Decode scaling probe: python launch/decode_probe.py --config=configs/deep_exit.py --out=FILE.json

Full-depth decode time per token at each --batches with a short and a long cache
(--new_tokens after --prompt_len-token prompts), and tokens/s at batch B over batch 1 next
to two bare chains of matmuls: the MLP's two shapes, and every product of a decode step in
the model's shapes (adaptive_depth/decode/scaling_probe.py), at each
step of cache read lengths in --read_chunks (e.g. --read_chunks=64,0 times the default
against reading the whole cache layer every step). Random parameters: no trained model
needed.
"""
from absl import flags
from ml_collections import config_flags

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth.decode import kv_cache
from adaptive_depth.decode import scaling_probe

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report.')
_BATCHES = flags.DEFINE_string('batches', '1,8', 'Batch sizes (must include 1).')
_NEW_TOKENS = flags.DEFINE_string('new_tokens', '32,256', 'New tokens: short and long cache.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens per row.')
_READ_CHUNKS = flags.DEFINE_string(
    'read_chunks', str(kv_cache.READ_CHUNK),
    'Steps of cache read lengths to time side by side (0: read the whole cache layer every '
    'step); ratios are to the first.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds, each running every setting '
                                 'once in turn (figures are medians over rounds).')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  scaling_probe.run_probe(
      _CONFIG.value, _OUT.value,
      batches=config_lib.parse_list(_BATCHES.value, int, '--batches'),
      new_tokens=config_lib.parse_list(_NEW_TOKENS.value, int, '--new_tokens'),
      prompt_len=_PROMPT_LEN.value, repeats=_REPEATS.value,
      read_chunks=config_lib.parse_list(_READ_CHUNKS.value, int, '--read_chunks'))


if __name__ == '__main__':
  cli.run(main)
