r"""python launch/train.py --config=configs/recursive.py --workdir=/tmp/recursive

Recursive depth: 2 shared blocks looped 3 times (6 steps) with per-step LoRA.

Variants:
  :vanilla  the 2-layer unshared model with the same unique block parameters (the baseline);
  :nolora   the same loop without relaxation;
  :tiny     a seconds-long smoke run.
Both the recursive model and the baseline exit after every step and train for the same
number of steps on the bundled corpus, so their summary.json files compare directly.
"""
from adaptive_depth import config_lib

VARIANTS = ('', 'vanilla', 'nolora', 'tiny')


def get_config(variant: str = ''):
  if variant not in VARIANTS:
    raise config_lib.ConfigError(f'configs/recursive.py: unknown variant {variant!r}; allowed: {VARIANTS}')
  config = config_lib.base_config()
  config.model.width = 192
  config.model.mlp_dim = 512
  config.train.learning_rate = 4e-3
  config.model.num_layers = 6
  config.model.num_blocks = 2
  config.model.schedule = 'cycle'
  config.model.lora_rank = 8
  config.train.num_steps = 300
  if variant == 'vanilla':
    config.model.num_layers = 2
    config.model.num_blocks = 0
    config.model.schedule = 'unshared'
    config.model.lora_rank = 0
  elif variant == 'nolora':
    config.model.lora_rank = 0
  elif variant == 'tiny':
    config.model.width = 64
    config.model.mlp_dim = 128
    config.data.seq_len = 32
    config.train.batch_size = 8
    config.train.num_steps = 10
    config.train.warmup_steps = 2
    config.eval.batch_size = 8
    config.eval.num_batches = 2
  return config
