"""A model's static description: ModelConfig (built from `config.model`), its exit depths,
and the depth schedule that maps each loop step to the block it runs.

model.py re-exports these names: `model.ModelConfig` is what the rest of the library reads.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import attention as attention_lib
from adaptive_depth import layers
from adaptive_depth import mor_config
from adaptive_depth import norms

SCHEDULES = ('unshared', 'cycle', 'sequence', 'middle_cycle', 'middle_sequence')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Static description of a model; `from_config(config.model)` builds it."""
  vocab_size: int
  width: int
  num_layers: int
  num_blocks: int
  schedule: str
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  exit_depths: tuple[int, ...]
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = 'float32'
  remat: bool = False
  scan_unroll: int = 1  # train-mode depth scan: steps per unrolled iteration
  init_std: float = 0.02
  lora_rank: int = 0
  qkv_bias: bool = False
  # Per-exit heads (every exit but the last, which always reads through final_norm):
  # an RMSNorm scale of its own, and a low-rank residual adapter of this rank (0 = none).
  exit_norms: bool = False
  exit_adapter_rank: int = 0
  attention: str = 'xla'  # resolved (attention.resolve): never 'auto'
  # Mixture-of-Recursions routing (routers.py, mor.py); None: every token runs every step.
  routing: Optional[mor_config.RoutingConfig] = None

  @classmethod
  def from_config(cls, model_config) -> 'ModelConfig':
    """Builds from a validated `config.model` ConfigDict (see config_lib.validate)."""
    m = model_config
    num_blocks = m.num_blocks or m.num_layers
    return cls(
        vocab_size=m.vocab_size, width=m.width, num_layers=m.num_layers,
        num_blocks=num_blocks, schedule=m.schedule, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.head_dim or m.width // m.num_heads, mlp_dim=m.mlp_dim,
        exit_depths=parse_exit_layers(m.exit_layers, m.num_layers, m.min_exit_layer),
        rope_base=m.rope_base, norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings,
        dtype=m.dtype, remat=m.remat, scan_unroll=m.scan_unroll, init_std=m.init_std,
        lora_rank=m.lora_rank,
        qkv_bias=m.qkv_bias, exit_norms=m.exit_norms, exit_adapter_rank=m.exit_adapter_rank,
        attention=attention_lib.resolve(m.attention),
        routing=mor_config.from_model_config(m))

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def block_config(self) -> layers.BlockConfig:
    return layers.BlockConfig(
        width=self.width, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim, mlp_dim=self.mlp_dim, rope_base=self.rope_base,
        norm_eps=self.norm_eps, dtype=self.compute_dtype, init_std=self.init_std,
        residual_init_scale=1.0 / np.sqrt(2.0 * self.num_layers), qkv_bias=self.qkv_bias,
        attention=self.attention)

  @property
  def block(self) -> layers.Block:
    return layers.Block(self.block_config)

  @property
  def final_norm(self) -> norms.RMSNorm:
    return norms.RMSNorm(eps=self.norm_eps, dtype=self.compute_dtype)

  @property
  def has_exit_heads(self) -> bool:
    """Whether the early exits have parameters of their own (params['exit_heads'])."""
    return self.exit_norms or self.exit_adapter_rank > 0


def parse_exit_layers(spec: str, num_layers: int, min_exit_layer: int = 1) -> tuple[int, ...]:
  """Exit depths from a config string; the last layer is always an exit.

  'all' -> every depth from min_exit_layer; 'last' -> (num_layers,); 'every:K' -> K, 2K, ...;
  '2,4,6' -> those depths. Raises ValueError naming config.model.exit_layers.
  """
  spec = str(spec).strip()
  try:
    if spec == 'all':
      depths = range(min_exit_layer, num_layers + 1)
    elif spec == 'last':
      depths = [num_layers]
    elif spec.startswith('every:'):
      every = int(spec.split(':', 1)[1])
      if every < 1:
        raise ValueError
      depths = [d for d in range(every, num_layers + 1, every) if d >= min_exit_layer]
    else:
      depths = [int(x) for x in spec.split(',') if x.strip()]
  except ValueError:  # the syntax only; the range has its own message below
    raise ValueError(
        f"config.model.exit_layers={spec!r} is not understood; allowed: 'all', 'last', "
        "'every:K' with K >= 1, or a comma-separated list of depths such as '2,4'") from None
  bad = [d for d in depths if not 1 <= d <= num_layers]
  if bad:
    raise ValueError(f'config.model.exit_layers={spec!r} names depth(s) {bad} outside '
                     f'1..{num_layers} (config.model.num_layers)')
  early = [d for d in depths if d < min_exit_layer]
  if early:
    raise ValueError(f'config.model.exit_layers={spec!r} names depth(s) {early} below '
                     f'config.model.min_exit_layer={min_exit_layer}')
  return tuple(sorted(set(depths) | {num_layers}))


def block_index(schedule: str, step, num_steps: int, num_blocks: int):
  """Which block loop step `step` runs. Works on Python ints, numpy and traced jax arrays.

  unshared: s; cycle: s mod B; sequence: s // (S / B); middle_cycle / middle_sequence keep
  block 0 for the first step and block B-1 for the last and cycle / sequence the B-2 middle
  blocks over the S-2 middle steps.
  """
  if schedule == 'unshared':
    return step
  if schedule == 'cycle':
    return step % num_blocks
  if schedule == 'sequence':
    return step // (num_steps // num_blocks)
  middle_steps, middle_blocks = num_steps - 2, num_blocks - 2
  inner = step - 1
  if schedule == 'middle_cycle':
    middle = 1 + inner % middle_blocks
  elif schedule == 'middle_sequence':
    middle = 1 + inner // (middle_steps // middle_blocks)
  else:
    raise ValueError(f'config.model.schedule={schedule!r}; allowed: {SCHEDULES}')
  xp = jnp if isinstance(step, jax.Array) else np
  return xp.where(step == 0, 0, xp.where(step == num_steps - 1, num_blocks - 1, middle))


def block_table(cfg: ModelConfig) -> np.ndarray:
  """[num_layers] int: the block each loop step runs."""
  return np.asarray(block_index(cfg.schedule, np.arange(cfg.num_layers), cfg.num_layers,
                                cfg.num_blocks), dtype=np.int32)
