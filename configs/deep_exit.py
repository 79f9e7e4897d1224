r"""python launch/train.py --config=configs/deep_exit.py --workdir=/tmp/deep_exit

A 12-layer, width-512 byte-level early-exit model: deep and wide enough that one layer's
decode cost dominates the decode loop's own overhead, so early-exit savings show up in
wall-clock tokens/s (`launch/benchmark.py`). Trained with the uniform multi-exit loss with an
exit after every layer; sized to train in well under 45 minutes on a 2-core CPU
(250 steps of 16 x 128 bytes).

Variants: `:tiny` (seconds, for tests).
"""
from adaptive_depth import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.model.width = 512
  config.model.num_layers = 12
  config.model.num_heads = 8
  config.model.num_kv_heads = 2   # GQA keeps the K/V of skipped layers cheap to fill
  config.model.mlp_dim = 1024
  config.data.seq_len = 128
  config.train.batch_size = 16
  config.train.num_steps = 250
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 30
  config.train.log_every = 10
  config.checkpoint.every_steps = 50
  config.eval.batch_size = 16
  config.eval.num_batches = 16
  config.benchmark.thresholds = '0.5,0.6,0.7,0.8,0.9,0.95'
  config.benchmark.speculative = '3x4,4x4,6x4'
  config.generate.measure = 'max_prob'
  config.generate.threshold = 0.9
  if variant == 'tiny':
    config.model.width = 64
    config.model.num_heads = 4
    config.model.mlp_dim = 128
    config.data.seq_len = 32
    config.train.batch_size = 8
    config.train.num_steps = 20
    config.train.warmup_steps = 2
    config.eval.num_batches = 2
    config.checkpoint.every_steps = 10
  elif variant:
    raise config_lib.ConfigError(f"configs/deep_exit.py: unknown variant {variant!r}; allowed: '', 'tiny'")
  return config
