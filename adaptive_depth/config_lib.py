"""The config schema (`base_config`) and `validate`, which runs before anything compiles.

Experiment files in `configs/` start from `base_config()` and change values; `validate`
rejects keys the schema does not know and values that cannot work, with one line per
problem naming the key and what is allowed. The checks of the decoding groups (generate,
serve, benchmark) and the parsers of list-valued settings live in config_decoding.
"""
from __future__ import annotations

import ml_collections

from adaptive_depth import attention as attention_lib
from adaptive_depth import config_decoding
# Re-exported: the rest of the library reads them as config_lib.*.
from adaptive_depth.config_decoding import (  # pylint: disable=unused-import
    BENCHMARK_MODES, ConfigError, parse_list, parse_range, parse_speculative)
from adaptive_depth import model_config
from adaptive_depth import mor_config
from adaptive_depth.data import tokenizers
from adaptive_depth.train import losses

EXIT_LOSS_WEIGHTS = ('uniform', 'linear', 'last')
EXIT_LOSSES = losses.KINDS
TRAINABLE = ('all', 'exit_heads')
STAGES = ('model', 'exit_classifier')


def base_config() -> ml_collections.ConfigDict:
  """Every key the library reads, with defaults (a small byte-level model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 'model'               # 'model' | 'exit_classifier' (second stage, frozen model)

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 258
  c.model.width = 256
  c.model.num_layers = 4          # depth-loop steps
  c.model.num_blocks = 0          # distinct stacked blocks; 0 = num_layers (no sharing)
  c.model.schedule = 'unshared'   # one of model_config.SCHEDULES
  c.model.num_heads = 4
  c.model.num_kv_heads = 0        # 0 = num_heads
  c.model.head_dim = 0            # 0 = width // num_heads
  c.model.mlp_dim = 688
  c.model.exit_layers = 'all'     # 'all' | 'last' | 'every:K' | '2,4'
  c.model.min_exit_layer = 1
  c.model.rope_base = 10000.0
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = True
  c.model.dtype = 'float32'       # compute dtype; parameters stay float32
  c.model.remat = False
  c.model.scan_unroll = 1         # train-mode depth scan: steps unrolled per iteration (1 =
                                  # rolled; num_layers = fully unrolled, faster, longer compile)
  c.model.init_std = 0.02
  c.model.lora_rank = 0           # per-step LoRA on shared blocks (relaxed recursion)
  c.model.exit_norms = False      # each early exit gets its own RMSNorm scale
  c.model.exit_adapter_rank = 0   # each early exit gets a low-rank residual adapter (0 = none)
  c.model.qkv_bias = False        # biases on the q/k/v projections (Qwen2 checkpoints)
  c.model.attention = 'auto'      # one of attention.IMPLEMENTATIONS; 'auto': the platform's best
  c.model.mor = ml_collections.ConfigDict()  # Mixture-of-Recursions (routers.py, mor.py)
  c.model.mor.routing = ''        # '' = none | 'expert_choice' | 'token_choice'
  c.model.mor.recursions = 0      # N_r: (num_layers - 2) / (num_blocks - 2) under middle_cycle
  c.model.mor.capacities = ''     # expert_choice: per recursion fractions of T, non-increasing;
                                  # '' = (N_r - r + 1) / N_r, e.g. 1,0.67,0.33
  c.model.mor.capacity_factor = 1.0  # token_choice: capacity over a balanced assignment's
  c.model.mor.kv = 'recursion_wise'  # 'recursion_wise' | 'shared' (recursion 1's K/V)
  c.model.mor.router = 'linear'   # 'linear' | 'mlp'
  c.model.mor.router_hidden = 64  # 'mlp': hidden units
  c.model.mor.gate = 'router'     # 'router': alpha * sigmoid / softmax; 'pass_through': 1
  c.model.mor.alpha = 0.1
  c.model.mor.aux_loss = 1e-3     # expert_choice: BCE of router logits on top-k membership
  c.model.mor.balance_loss = 0.1  # token_choice: load balancing
  c.model.mor.z_loss = 1e-5       # token_choice: router z-loss

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'bundled_tiny_shakespeare'
  c.data.text_feature = 'text'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.tfds_data_dir = ''       # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.tokenizer = 'byte'       # 'byte' | 'bpe' (reads data.tokenizer_file)
  c.data.tokenizer_file = ''      # 'bpe': a tokenizer.json or a .gguf file with a vocabulary
  c.data.bos_id = -1              # -1 = the tokenizer's own
  c.data.eos_id = -1              # -1 = the tokenizer's own
  c.data.chat_template = ''       # Jinja chat template; '' = the tokenizer file's own, if any
  c.data.seq_len = 128

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.num_steps = 1000
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.final_lr_fraction = 0.1  # cosine decays to learning_rate * this
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip_norm = 1.0
  c.train.exit_loss_weights = 'uniform'  # one of EXIT_LOSS_WEIGHTS
  c.train.exit_loss = 'lm'        # 'lm': cross entropy on the corpus at every exit;
                                  # 'distill': early exits match the last exit (KL);
                                  # 'lm_distill': early exits get both;
                                  # 'lm_steady': each exit also matches the one before (KL;
                                  # with exit_loss_weights='last' only the last exit's term)
  c.train.loss_chunk_tokens = 0   # > 0: the multi-exit loss in chunks of this many positions,
                                  # never holding exits x tokens x vocab logits (large vocabularies)
  c.train.trainable = 'all'       # 'all' | 'exit_heads' (trunk frozen: only exit heads train)
  c.train.batch_splits = 0        # the batch as this many independent parts in one step (same
                                  # gradient); 0: 2 on a single CPU device, where XLA then runs
                                  # the parts' operations side by side on the cores, else 1
  c.train.init_from = ''          # a workdir: start from its latest checkpoint's parameters
  c.train.log_every = 25
  c.train.progress_bar = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0          # 0 = only at the end
  c.eval.batch_size = 32
  c.eval.num_batches = 0          # 0 = the whole eval split

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.classifier = ml_collections.ConfigDict()  # the exit classifier stage
  c.classifier.hidden = 64
  c.classifier.num_steps = 200
  c.classifier.learning_rate = 3e-3
  c.classifier.batch_size = 16

  c.generate = ml_collections.ConfigDict()  # launch/generate.py and generate_from_config
  c.generate.max_new_tokens = 64
  c.generate.measure = 'never'    # an exits.MEASURES name
  # A number, or 'calibrated': the threshold launch/calibrate.py wrote to
  # WORKDIR/calibration.json for this measure (object-typed, so it takes either).
  c.generate.threshold = ml_collections.FieldReference(0.9, field_type=object)
  c.generate.schedule = 'constant'  # 'constant' | 'decaying'
  c.generate.tau = 4.0
  c.generate.zeta = 0.9           # 'adaptive': target posterior probability of agreement
  c.generate.refit_every = 16     # 'adaptive': observations between refits
  c.generate.per_row_statistics = False  # 'adaptive': each row fits its own mixture
  c.generate.min_depth = 1
  c.generate.kv = 'propagate'     # 'propagate' | 'parallel'
  c.generate.queue_capacity = 8   # 'parallel': queued tokens per row before a forced deep pass
  c.generate.speculative = ''      # 'ExK': greedy self-speculative, draft k with E layers
  c.generate.temperature = 0.0    # 0 = greedy
  c.generate.top_k = 0
  c.generate.top_p = 1.0
  c.generate.seed = 0

  c.serve = ml_collections.ConfigDict()  # launch/serve.py: the depth-wise batching engine
  c.serve.slots = 16              # requests decoded at once, each at its own depth
  c.serve.chunk_ticks = 16        # engine ticks per device loop between host refills
  c.serve.cache_len = 0           # positions per slot; 0 = fit the longest request
  c.serve.prefill_ahead_count = 2  # prompts prefilled beside the ticks, ahead of free slots
  c.serve.finish_slots = 0        # MoR: slots that may finish a token per tick (0 = 1.5 x
                                  # slots / the mean recursions of the training capacities)

  c.calibrate = ml_collections.ConfigDict()  # launch/calibrate.py (Learn-then-Test)
  c.calibrate.num_examples = 512  # validation windows: a prompt, then a reference continuation
  c.calibrate.prompt_len = 32
  c.calibrate.new_tokens = 16     # continuation length compared with full depth's
  c.calibrate.batch_size = 128    # examples decoded at once
  c.calibrate.kv = 'propagate'    # KV policy of the early-exit continuations
  c.calibrate.calibration_fraction = 0.5  # --splits: calibration share of each random split

  c.benchmark = ml_collections.ConfigDict()  # launch/benchmark.py (decode speed)
  c.benchmark.mode = 'decode'     # 'decode': the settings below at fixed batches;
                                  # 'engine': a request stream, static batching vs engine
  c.benchmark.slots = '8,16,32'   # 'engine': slot counts (= static batch sizes)
  c.benchmark.num_requests = 128  # 'engine': requests in the stream
  c.benchmark.prompt_lens = '8,64'    # 'engine': prompt lengths, uniform in [min, max]
  c.benchmark.output_lens = '16,128'  # 'engine': max_new_tokens, uniform in [min, max]
  c.benchmark.seed = 0            # 'engine': the stream's draws
  c.benchmark.batches = '1,8'
  c.benchmark.prompt_len = 32
  c.benchmark.max_new_tokens = 128
  c.benchmark.repeats = 3         # timed runs per setting (median), after one warm-up
  c.benchmark.measure = 'max_prob'
  c.benchmark.thresholds = '0.5,0.7,0.8,0.9,0.95'
  c.benchmark.kv = 'propagate,parallel'
  c.benchmark.zetas = ''          # e.g. '0.99,0.995': FREE's adaptive threshold rows (kv
                                  # parallel, schedule 'adaptive'), one per target zeta; each
                                  # starts at the highest of benchmark.thresholds
  c.benchmark.queue_capacity = 8
  c.benchmark.speculative = ''    # e.g. '4x4,6x3': draft depth x drafted tokens; '' = none
  c.benchmark.transformers_source = ''  # .gguf / HF dir: launch/benchmark.py times transformers

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('vocab', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('layers', None),
      ('head_dim', None),
      ('norm', None),
      ('length', None),
      ('exits', None),
      ('adapter_embed', None),
      ('adapter_rank', None),
      ('recursions', None),
      ('router_hidden', None),
  )
  return c


def _unknown_keys(config, schema, prefix='config'):
  problems = []
  for key in config.keys():
    path = f'{prefix}.{key}'
    if key not in schema:
      problems.append(f'{path}: unknown key; allowed keys of {prefix}: {sorted(schema.keys())}')
    elif isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        problems.append(f'{path}: must be a group of keys {sorted(schema[key].keys())}')
      else:
        problems.extend(_unknown_keys(config[key], schema[key], path))
  return problems


def _value_problems(c) -> list[str]:
  p = []
  m, t = c.model, c.train

  def positive(group, name, value):
    if not value > 0:
      p.append(f'config.{group}.{name}={value!r}: must be > 0')

  for name in ('vocab_size', 'width', 'num_layers', 'num_heads', 'mlp_dim'):
    positive('model', name, m[name])
  for name in ('batch_size', 'num_steps', 'learning_rate'):
    positive('train', name, t[name])
  positive('data', 'seq_len', c.data.seq_len)
  positive('eval', 'batch_size', c.eval.batch_size)
  positive('checkpoint', 'every_steps', c.checkpoint.every_steps)
  positive('checkpoint', 'keep', c.checkpoint.keep)
  positive('train', 'log_every', t.log_every)
  for name in ('rope_base', 'norm_eps', 'init_std', 'scan_unroll'):
    positive('model', name, m[name])
  for name in ('hidden', 'num_steps', 'learning_rate', 'batch_size'):
    positive('classifier', name, c.classifier[name])
  if c.seed < 0:
    p.append(f'config.seed={c.seed}: must be >= 0')
  if m.head_dim < 0:
    p.append(f'config.model.head_dim={m.head_dim}: must be >= 0 (0 = width // num_heads)')
  if t.batch_splits < 0:
    p.append(f'config.train.batch_splits={t.batch_splits}: must be >= 0 (0 = automatic, '
             '1 = the whole batch at once)')
  elif t.batch_splits > 1 and t.batch_size % t.batch_splits:
    p.append(f'config.train.batch_splits={t.batch_splits} must divide '
             f'config.train.batch_size={t.batch_size}')
  if t.loss_chunk_tokens < 0:
    p.append(f'config.train.loss_chunk_tokens={t.loss_chunk_tokens}: must be >= 0 '
             '(0 = the whole sequence at once)')
  elif t.loss_chunk_tokens and c.data.seq_len > 0:
    chunk = max(d for d in range(1, min(c.data.seq_len, t.loss_chunk_tokens) + 1)
                if c.data.seq_len % d == 0)
    if 2 * chunk < min(c.data.seq_len, t.loss_chunk_tokens):
      p.append(f'config.train.loss_chunk_tokens={t.loss_chunk_tokens}: chunks must divide '
               f'config.data.seq_len={c.data.seq_len}, and its largest divisor not above '
               f'that is {chunk}; choose a divisor of the sequence length')
  if p:
    return p  # later checks divide by these

  if c.stage not in STAGES:
    p.append(f'config.stage={c.stage!r}; allowed: {", ".join(STAGES)}')
  if m.schedule not in model_config.SCHEDULES:
    p.append(f'config.model.schedule={m.schedule!r}; allowed: {", ".join(model_config.SCHEDULES)}')
  if m.dtype not in model_config.DTYPES:
    p.append(f'config.model.dtype={m.dtype!r}; allowed: {", ".join(model_config.DTYPES)}')
  if m.attention not in attention_lib.IMPLEMENTATIONS:
    p.append(f'config.model.attention={m.attention!r}; allowed: '
             f'{", ".join(attention_lib.IMPLEMENTATIONS)}')
  elif attention_lib.platform_error(m.attention):
    p.append(attention_lib.platform_error(m.attention))
  if not m.head_dim and m.width % m.num_heads:
    p.append(f'config.model.num_heads={m.num_heads} does not divide '
             f'config.model.width={m.width} (or set config.model.head_dim)')
  elif (m.head_dim or m.width // m.num_heads) % 2:
    p.append(f'config.model.head_dim={m.head_dim or m.width // m.num_heads} must be even '
             '(rotary embeddings rotate pairs of features); change config.model.width, '
             'config.model.num_heads or config.model.head_dim')
  kv = m.num_kv_heads or m.num_heads
  if kv <= 0 or m.num_heads % kv:
    p.append(f'config.model.num_kv_heads={m.num_kv_heads} must divide '
             f'config.model.num_heads={m.num_heads}')
  if not 1 <= m.min_exit_layer <= m.num_layers:
    p.append(f'config.model.min_exit_layer={m.min_exit_layer}: allowed 1..{m.num_layers} '
             '(config.model.num_layers)')
  else:
    try:
      model_config.parse_exit_layers(m.exit_layers, m.num_layers, m.min_exit_layer)
    except ValueError as e:
      p.append(str(e))
  p.extend(_schedule_problems(m))
  if m.lora_rank < 0:
    p.append(f'config.model.lora_rank={m.lora_rank}: must be >= 0 (0 = no LoRA)')
  p.extend(_exit_head_problems(c))
  p.extend(mor_config.config_problems(m))

  try:
    tokenizer = tokenizers.from_config(c.data)
    if m.vocab_size < tokenizer.vocab_size:
      p.append(f'config.model.vocab_size={m.vocab_size} is smaller than the '
               f'{c.data.tokenizer!r} tokenizer vocabulary ({tokenizer.vocab_size})')
    for name in ('bos_id', 'eos_id'):
      if not -1 <= c.data[name] < m.vocab_size:
        p.append(f'config.data.{name}={c.data[name]}: allowed -1 (the tokenizer\'s own) or '
                 f'0..{m.vocab_size - 1} (config.model.vocab_size - 1)')
  except ValueError as e:
    p.append(str(e))

  if t.exit_loss_weights not in EXIT_LOSS_WEIGHTS:
    p.append(f'config.train.exit_loss_weights={t.exit_loss_weights!r}; '
             f'allowed: {", ".join(EXIT_LOSS_WEIGHTS)}')
  if t.warmup_steps < 0 or t.warmup_steps >= t.num_steps:
    p.append(f'config.train.warmup_steps={t.warmup_steps}: allowed 0..num_steps-1 '
             f'(config.train.num_steps={t.num_steps})')
  if not 0 <= t.final_lr_fraction <= 1:
    p.append(f'config.train.final_lr_fraction={t.final_lr_fraction}: allowed 0..1')
  if t.weight_decay < 0:
    p.append(f'config.train.weight_decay={t.weight_decay}: must be >= 0')
  if t.grad_clip_norm < 0:
    p.append(f'config.train.grad_clip_norm={t.grad_clip_norm}: must be >= 0 (0 = no clipping)')
  for name in ('b1', 'b2'):
    if not 0 <= t[name] < 1:
      p.append(f'config.train.{name}={t[name]}: allowed 0 <= value < 1')
  if c.eval.every_steps < 0 or c.eval.num_batches < 0:
    p.append('config.eval.every_steps and config.eval.num_batches must be >= 0 (0 = default)')
  p.extend(config_decoding.generate_problems(c.generate))
  p.extend(config_decoding.serve_problems(c.serve))
  p.extend(config_decoding.calibrate_problems(c.calibrate))
  p.extend(config_decoding.benchmark_problems(c.benchmark, m.num_layers))
  for axis in ('data', 'fsdp', 'tensor'):
    size = c.mesh[axis]
    if size == 0 or size < -1:
      p.append(f'config.mesh.{axis}={size}; allowed: a positive size or -1 (the rest)')
  return p


def _exit_head_problems(c) -> list[str]:
  """Per-exit heads and what trains them."""
  p = []
  m, t = c.model, c.train
  if m.exit_adapter_rank < 0:
    p.append(f'config.model.exit_adapter_rank={m.exit_adapter_rank}: must be >= 0 '
             '(0 = no adapters)')
  has_heads = m.exit_norms or m.exit_adapter_rank > 0
  try:
    depths = model_config.parse_exit_layers(m.exit_layers, m.num_layers, m.min_exit_layer)
  except ValueError:
    depths = None  # reported with config.model.exit_layers
  if has_heads and depths is not None:
    if len(depths) < 2:
      p.append(f'config.model.exit_norms={m.exit_norms} / config.model.exit_adapter_rank='
               f'{m.exit_adapter_rank} need an early exit, but config.model.exit_layers='
               f'{m.exit_layers!r} has only the last layer')
    else:
      p.extend(config_decoding.speculative_head_problems(c.benchmark.speculative, depths))
  if t.exit_loss not in EXIT_LOSSES:
    p.append(f'config.train.exit_loss={t.exit_loss!r}; allowed: {", ".join(EXIT_LOSSES)}')
  if t.trainable not in TRAINABLE:
    p.append(f'config.train.trainable={t.trainable!r}; allowed: {", ".join(TRAINABLE)}')
  elif t.trainable == 'exit_heads' and not has_heads:
    p.append("config.train.trainable='exit_heads' needs exit heads to train: set "
             'config.model.exit_norms=True or config.model.exit_adapter_rank > 0')
  if not isinstance(t.init_from, str):
    p.append(f'config.train.init_from={t.init_from!r}: must be a workdir path or \'\'')
  return p


def _schedule_problems(m) -> list[str]:
  steps, blocks = m.num_layers, m.num_blocks or m.num_layers
  where = (f'config.model.num_blocks={m.num_blocks} with config.model.schedule={m.schedule!r} '
           f'and config.model.num_layers={steps}')
  if blocks < 0 or blocks > steps:
    return [f'{where}: num_blocks must be in 1..num_layers (0 = num_layers)']
  if m.schedule == 'unshared' and blocks != steps:
    return [f'{where}: unshared needs num_blocks == num_layers (or 0)']
  if m.schedule == 'sequence' and steps % blocks:
    return [f'{where}: sequence needs num_blocks to divide num_layers']
  if m.schedule.startswith('middle_'):
    if blocks < 3:
      return [f'{where}: middle schedules need num_blocks >= 3 (first, middle, last)']
    if m.schedule == 'middle_sequence' and (steps - 2) % (blocks - 2):
      return [f'{where}: middle_sequence needs num_blocks - 2 to divide num_layers - 2']
  return []


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError listing every problem (one line each, naming the key)."""
  problems = _unknown_keys(config, base_config())
  if not problems:
    problems = _value_problems(config)
  if problems:
    raise ConfigError('\n'.join(problems))
  return config
