r"""python launch/train.py --config=configs/mor.py --workdir=/tmp/mor

Mixture-of-Recursions: a unique first layer, 3 recursions of 2 shared blocks, a unique last
layer (8 loop steps over 4 blocks, `middle_cycle`); expert-choice routers keep all the
tokens for recursion 1, the top 2/3 of those for recursion 2 and the top 1/3 for recursion 3.

Variants:
  :token_choice  one router gives each token its depth 1..3 (capacity factor 1.0);
  :kv_shared     recursions 2 and 3 attend to recursion 1's K/V;
  :recursive     the same core without routers: every token runs every recursion;
  :vanilla       8 unshared layers of the same width (twice the unique blocks);
  :tiny          a seconds-long smoke run.

Equal training FLOPs. Per token at 128 tokens, by costs.mor_flops_per_token (the routers
and the attention over gathered tokens counted), the routed models spend 0.750 of what
`:recursive` and `:vanilla` spend (`:kv_shared` 0.716), so they train for 534 steps
(`:kv_shared` 559) where those train for 400 on the same batches: the same training FLOPs
within 0.1%, on more tokens (tests/test_mor.py checks this against costs).
"""
from adaptive_depth import config_lib

VARIANTS = ('', 'token_choice', 'kv_shared', 'recursive', 'vanilla', 'tiny')
FULL_COMPUTE_STEPS = 400   # :recursive and :vanilla
ROUTED_STEPS = 534         # the routed variants: the same training FLOPs (docstring)
KV_SHARED_STEPS = 559


def get_config(variant: str = ''):
  if variant not in VARIANTS:
    raise config_lib.ConfigError(f'configs/mor.py: unknown variant {variant!r}; allowed: '
                                 f'{", ".join(repr(v) for v in VARIANTS)}')
  config = config_lib.base_config()
  m = config.model
  m.width = 192
  m.mlp_dim = 512
  m.num_heads = 4
  m.num_layers = 8
  m.num_blocks = 4
  m.schedule = 'middle_cycle'
  m.exit_layers = 'last'
  m.mor.routing = 'expert_choice'
  m.mor.recursions = 3
  config.train.exit_loss_weights = 'last'
  config.generate.measure = 'router'  # decode with the routers (expert choice: sigmoid > 0.5)
  config.generate.threshold = 0.5
  config.train.learning_rate = 4e-3
  config.train.num_steps = ROUTED_STEPS
  config.eval.num_batches = 0
  if variant == 'token_choice':
    m.mor.routing = 'token_choice'
  elif variant == 'kv_shared':
    m.mor.kv = 'shared'
    config.train.num_steps = KV_SHARED_STEPS
  elif variant in ('recursive', 'vanilla'):
    m.mor.routing = ''
    m.mor.recursions = 0
    config.generate.measure = 'never'
    config.train.num_steps = FULL_COMPUTE_STEPS
    if variant == 'vanilla':
      m.num_blocks = 0
      m.schedule = 'unshared'
  elif variant == 'tiny':
    m.width = 64
    m.mlp_dim = 128
    m.num_layers = 5       # 3 recursions of 1 shared block
    m.num_blocks = 3
    config.data.seq_len = 24
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.warmup_steps = 1
    config.train.log_every = 2
    config.train.progress_bar = False
    config.eval.batch_size = 8
    config.eval.num_batches = 2
    config.checkpoint.every_steps = 3
  return config
