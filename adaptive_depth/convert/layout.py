"""From a Llama-family checkpoint's tensors to this library's config and parameter pytree.

Both importers (GGUF, Hugging Face directory) first bring every tensor to one neutral form:
the PyTorch `nn.Linear` layout, float32 numpy, under these names (i = layer):

    embed [V, D]        final_norm [D]       lm_head [V, D] (untied only)
    i.attn_norm [D]     i.mlp_norm [D]
    i.q [H*Dh, D]       i.k, i.v [KV*Dh, D]  i.o [D, H*Dh]
    i.gate, i.up [F, D] i.down [D, F]
    i.q_bias [H*Dh]     i.k_bias, i.v_bias [KV*Dh]   (qkv_bias only)

with q and k in the half-split rotary order `layers.apply_rope` uses. `to_params` then
transposes and stacks them into the layout of `model.init_params` (see model.py), and
checks the result against that layout leaf by leaf.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptive_depth import config_lib
from adaptive_depth import model as model_lib

FAMILIES = ('llama', 'qwen2')
LAYER_TENSORS = ('attn_norm', 'mlp_norm', 'q', 'k', 'v', 'o', 'gate', 'up', 'down')
BIAS_TENSORS = ('q_bias', 'k_bias', 'v_bias')

Progress = Optional[Callable[[str], None]]


class Imported(NamedTuple):
  """What an importer returns: the run config (model keys filled, validated), the float32
  parameter pytree in `model.init_params` layout, and the `bpe.BPETokenizer`."""
  config: ml_collections.ConfigDict
  params: dict
  tokenizer: object


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The hyperparameters of a Llama-family checkpoint that this library's model needs."""
  family: str
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float
  norm_eps: float
  tie_embeddings: bool
  qkv_bias: bool

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'architecture {self.family!r} is not supported; allowed: '
                       f'{", ".join(FAMILIES)} (Llama-family decoders: SmolLM, Llama, Qwen2)')


def make_config(arch: Architecture, tokenizer, tokenizer_file: str) -> ml_collections.ConfigDict:
  """`config_lib.base_config()` with the model keys of `arch` and a BPE tokenizer, validated.

  A plain (unshared) stack with one exit after the last layer; set config.model.exit_layers
  to add early exits (their heads reuse the final norm and the output projection).
  """
  config = config_lib.base_config()
  m = config.model
  m.vocab_size, m.width, m.num_layers = arch.vocab_size, arch.width, arch.num_layers
  m.num_blocks, m.schedule = arch.num_layers, 'unshared'
  m.num_heads, m.num_kv_heads, m.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
  m.mlp_dim, m.rope_base, m.norm_eps = arch.mlp_dim, float(arch.rope_base), float(arch.norm_eps)
  m.tie_embeddings, m.qkv_bias = bool(arch.tie_embeddings), bool(arch.qkv_bias)
  m.exit_layers, m.min_exit_layer, m.dtype = 'last', 1, 'float32'
  d = config.data
  d.tokenizer, d.tokenizer_file = 'bpe', tokenizer_file
  d.bos_id, d.eos_id = tokenizer.bos_id, tokenizer.eos_id
  d.chat_template = tokenizer.chat_template or ''
  return config_lib.validate(config)


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's reordering of q/k projection rows for its interleaved RoPE.

  llama.cpp stores each head's rows as pairs (j, j + Dh/2) side by side, i.e. row order
  (head, j, half); `layers.apply_rope` rotates (j, j + Dh/2), i.e. order (head, half, j).
  w: [N*Dh, ...] -> [N*Dh, ...].
  """
  rows = w.shape[0]
  head_dim = rows // num_heads
  return (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def expected_names(arch: Architecture) -> list[str]:
  """Every neutral tensor name `arch` needs (see the module docstring)."""
  names = ['embed', 'final_norm'] + ([] if arch.tie_embeddings else ['lm_head'])
  per_layer = LAYER_TENSORS + (BIAS_TENSORS if arch.qkv_bias else ())
  return names + [f'{i}.{n}' for i in range(arch.num_layers) for n in per_layer]


def to_params(arch: Architecture, model_config: model_lib.ModelConfig, tensors: dict,
              progress: Progress = None) -> dict:
  """Neutral tensors -> the `model.init_params` pytree (jnp float32), checked against it.

  tensors: {name: np.ndarray}; consumed (emptied) to keep peak memory near one copy.
  """
  missing = [n for n in expected_names(arch) if n not in tensors]
  if missing:
    raise ValueError(f'the checkpoint lacks {len(missing)} tensor(s) a {arch.family} model '
                     f'needs, e.g. {missing[:5]}')
  d, h, kv, dh = arch.width, arch.num_heads, arch.num_kv_heads, arch.head_dim
  reshapes = {
      'attn_norm': lambda w: w, 'mlp_norm': lambda w: w,
      'q': lambda w: w.T.reshape(d, h, dh), 'k': lambda w: w.T.reshape(d, kv, dh),
      'v': lambda w: w.T.reshape(d, kv, dh), 'o': lambda w: w.T.reshape(h, dh, d),
      'gate': lambda w: w.T, 'up': lambda w: w.T, 'down': lambda w: w.T,
      'q_bias': lambda b: b.reshape(h, dh), 'k_bias': lambda b: b.reshape(kv, dh),
      'v_bias': lambda b: b.reshape(kv, dh)}

  def stacked(name):
    per_layer = [reshapes[name](tensors.pop(f'{i}.{name}')) for i in range(arch.num_layers)]
    return jnp.asarray(np.stack(per_layer).astype(np.float32))

  attn = {n: stacked(n) for n in ('q', 'k', 'v', 'o')}
  if arch.qkv_bias:
    attn.update({n: stacked(n) for n in BIAS_TENSORS})
  params = {
      'embed': {'embedding': jnp.asarray(tensors.pop('embed'), jnp.float32)},
      'blocks': {'attn_norm': {'scale': stacked('attn_norm')}, 'attn': attn,
                 'mlp_norm': {'scale': stacked('mlp_norm')},
                 'mlp': {n: stacked(n) for n in ('gate', 'up', 'down')}},
      'final_norm': {'scale': jnp.asarray(tensors.pop('final_norm'), jnp.float32)},
  }
  if not arch.tie_embeddings:
    params['lm_head'] = {'kernel': jnp.asarray(tensors.pop('lm_head').T, jnp.float32)}
  check_layout(model_config, params)
  if progress:
    progress(f'parameters: {model_lib.count_params(params) / 1e6:.1f}M in the layout of '
             'model.init_params')
  return params


def check_layout(model_config: model_lib.ModelConfig, params) -> None:
  """Raises ValueError unless `params` has exactly the names, shapes and float32 dtype
  that `model.init_params(model_config, ...)` makes."""
  want = jax.eval_shape(lambda: model_lib.init_params(model_config, jax.random.key(0)))
  flat = lambda tree: {jax.tree_util.keystr(path): x
                       for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want_flat, got_flat = flat(want), flat(params)
  problems = [f'{k}: missing' for k in want_flat if k not in got_flat]
  problems += [f'{k}: not a parameter of this model' for k in got_flat if k not in want_flat]
  problems += [f'{k}: {got_flat[k].shape} {got_flat[k].dtype}, want {w.shape} {w.dtype}'
               for k, w in want_flat.items() if k in got_flat and
               (got_flat[k].shape != w.shape or got_flat[k].dtype != w.dtype)]
  if problems:
    raise ValueError('imported parameters do not match model.init_params:\n' +
                     '\n'.join(problems))
