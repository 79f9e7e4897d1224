r"""python launch/train.py --config=configs/shared_exit.py --workdir=/tmp/shared_exit

The model the depth-wise batching engine serves (`launch/serve.py`, `launch/benchmark.py`
with config.benchmark.mode='engine'): one shared block of width 512 looped 12 times, an
exit after every loop step, byte-level, trained with the uniform multi-exit loss. One
block means every slot of the engine runs the same weights whatever its depth, so one
block call per tick serves all slots, and a slot may exit after any step. No per-step LoRA:
the frozen state of an exiting token then gives the same K/V at every step it skips, so
'propagate' computes it once. Sized like configs/deep_exit.py (the same per-step compute)
to train in under 45 minutes on a 2-core CPU (400 steps of 16 x 128 bytes).

Variants: `:tiny` (seconds, for tests).
"""
from adaptive_depth import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.model.width = 512
  config.model.num_layers = 12    # loop steps
  config.model.num_blocks = 1
  config.model.schedule = 'cycle'
  config.model.num_heads = 8
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 1024
  config.data.seq_len = 128
  config.train.batch_size = 16
  config.train.num_steps = 400
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 30
  config.train.log_every = 10
  config.checkpoint.every_steps = 100
  config.eval.batch_size = 16
  config.eval.num_batches = 16
  config.benchmark.mode = 'engine'
  config.benchmark.measure = 'max_prob'
  # 0.3: the lowest tried that kept agreement 0.95 on the benchmark stream (README,
  # Depth-wise batching on a request stream).
  config.benchmark.thresholds = '0.3,0.4,0.5,0.6,0.7,0.8'
  config.generate.measure = 'max_prob'
  config.generate.threshold = 0.6
  if variant == 'tiny':
    config.model.width = 64
    config.model.num_heads = 4
    config.model.mlp_dim = 128
    config.model.num_layers = 4
    config.data.seq_len = 32
    config.train.batch_size = 8
    config.train.num_steps = 20
    config.train.warmup_steps = 2
    config.eval.num_batches = 2
    config.checkpoint.every_steps = 10
  elif variant:
    raise config_lib.ConfigError(
        f"configs/shared_exit.py: unknown variant {variant!r}; allowed: '', 'tiny'")
  return config
