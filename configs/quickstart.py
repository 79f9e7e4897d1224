r"""python launch/train.py --config=configs/quickstart.py --workdir=/tmp/quickstart

Quickstart: a 4-layer byte-level early-exit model on the bundled tiny Shakespeare.

Exits after every layer, uniform multi-exit loss. Variants: `:tiny` (seconds, for tests and
notebooks), e.g. --config=configs/quickstart.py:tiny.
"""
from adaptive_depth import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  # Sized to finish in under ten minutes on a 2-core CPU: width 192, 380 steps of 32 x 128.
  config.model.width = 192
  config.model.mlp_dim = 512
  config.model.scan_unroll = 4    # the whole depth unrolled: a faster train step on CPU
  config.train.num_steps = 380
  config.train.learning_rate = 4e-3
  config.train.warmup_steps = 50
  if variant == 'tiny':
    config.model.scan_unroll = 1  # compiles faster: tests and notebooks
    config.model.width = 64
    config.model.num_heads = 4
    config.model.num_kv_heads = 2
    config.model.mlp_dim = 128
    config.data.seq_len = 32
    config.train.batch_size = 8
    config.train.num_steps = 20
    config.train.warmup_steps = 2
    config.train.log_every = 5
    config.eval.batch_size = 8
    config.eval.num_batches = 4
    config.checkpoint.every_steps = 10
  elif variant:
    raise config_lib.ConfigError(f"configs/quickstart.py: unknown variant {variant!r}; allowed: '', 'tiny'")
  return config
